"""Writing a pruned model's shapes (and the switches of biases a method added) into its config: the stock fields
when they can express the shapes, the osscar record (``quantization_config``) otherwise."""

from __future__ import annotations

import torch.nn as nn

from ..arch import ArchSpec, get_submodule
from ..config import OsscarConfig
from .channel_shapes import channel_shapes_expressed, read_channel_shapes
from .save import mark_pruned
from .shapes import stock_config_expresses
from ..surgery import block_shape, part_linears

__all__ = ["switch_on_part_biases", "update_channel_config", "update_model_config"]


def switch_on_part_biases(model: nn.Module, spec: ArchSpec) -> None:
    """Set the config switches (``spec.bias_switches``) of every part whose linears all have biases now, so that
    a stock model built from the config has them too."""
    blocks = list(get_submodule(model, spec.blocks))
    if not blocks:
        return
    for part, linears in part_linears(blocks[0], spec).items():
        switch = spec.bias_switches.get(part)
        if switch is not None and all(linear.bias is not None for linear in linears):
            setattr(spec.shape_config(model.config), switch, True)


def update_model_config(
    model: nn.Module, spec: ArchSpec, *, n_rep: int, head_dim: int, osscar_config: OsscarConfig | None = None
) -> list[dict[str, int]]:
    """Write the pruned shapes into ``model.config``; return every block's shape.

    When all blocks share one shape, the stock fields are updated where the architecture's config can
    express it (FFN width always; head counts only for configs with an explicit ``head_dim`` and a head
    count that divides ``hidden_size``, as transformers' validation requires). If the stock config then
    describes every block, the model is a plain smaller model and its config gets nothing else (plain
    ``save_pretrained`` writes a checkpoint vanilla transformers loads). Otherwise
    ``config.quantization_config`` becomes ``osscar_config.for_model_config(shapes)``: the pruning settings,
    the per-block shapes and the library versions, which the osscar quantizer reads on load. Biases a method
    added to every linear of a part (FLAP's compensation) switch the part's biases on in the config.

    Either way the model keeps that record (see :func:`osscar_hf.io.pruning_record`), and its
    ``save_pretrained`` refuses the folder the dense model was loaded from.
    """
    config = model.config
    fields = spec.shape_config(config)  # the decoder's fields (a multimodal model's text_config)
    switch_on_part_biases(model, spec)
    blocks = get_submodule(model, spec.blocks)
    shapes = [block_shape(block, spec, n_rep=n_rep, head_dim=head_dim) for block in blocks]
    if all(shape == shapes[0] for shape in shapes):
        shape = shapes[0]
        setattr(fields, spec.config_ffn, shape["ffn_dim"])
        shared = spec.shared_expert_spec()
        if shared is not None:
            setattr(fields, shared.config_ffn, shape["shared_ffn_dim"])
        heads = shape["num_attention_heads"]
        if spec.config_has_head_dim and heads > 0 and fields.hidden_size % heads == 0:
            fields.head_dim = head_dim
            setattr(fields, spec.config_heads, heads)
            if spec.config_kv_heads is not None:
                setattr(fields, spec.config_kv_heads, shape["num_key_value_heads"])
    record = (osscar_config if osscar_config is not None else OsscarConfig()).for_model_config(shapes)
    if stock_config_expresses(config, shapes, spec):
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
    else:
        config.quantization_config = record
    mark_pruned(model, record)
    return shapes


def update_channel_config(model: nn.Module, osscar_config: OsscarConfig) -> list[dict[str, list[int]]]:
    """Record the pruned widths in ``model.config.quantization_config`` (the osscar format; nothing when the stock
    config still describes the model) and leave the record on the model; return the shapes."""
    shapes = read_channel_shapes(model)
    record = osscar_config.for_model_config(shapes)
    if channel_shapes_expressed(model.config, shapes):
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    else:
        model.config.quantization_config = record
    mark_pruned(model, record)
    return shapes
