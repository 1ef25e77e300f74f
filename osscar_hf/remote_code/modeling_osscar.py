"""A causal LM pruned with OSSCAR: the family's stock model with every decoder block shrunk to its own shape.

Written beside the weights by osscar_hf (``save_pruned(model, folder, format="remote_code")``); needs only
torch and transformers. The model is built from the stock fields of the config (the unpruned shapes), then
every block listed in ``config.osscar_block_shapes`` keeps its first ``num_key_value_heads`` KV groups (with
the first ``num_attention_heads / num_key_value_heads`` of their ``n_rep`` query heads each) and its first ``ffn_dim``
FFN neurons: the linears that produce those
structures lose the output rows ``osscar_layout`` assigns them (``kept_rows``, whatever the projections' row
layout: separate, fused, interleaved), the ones that consume them lose input columns. Which values are kept does not
matter (the checkpoint's weights replace them); inside ``from_pretrained`` the model is built on the meta
device, so this costs nothing. A block left with no KV group gets an :class:`OsscarEmptyAttention`.

Apart from the sizes, the model is the stock one: it generates with a KV cache, casts, saves with
``save_pretrained`` (transformers copies these two files along) and loads with ``device_map``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaForCausalLM

from .configuration_osscar import (
    OsscarLlamaConfig,
    count_owner,
    kept_query_heads,
    kept_rows,
    producer_entries,
    set_count,
    structure_stride,
)


class OsscarEmptyAttention(nn.Module):
    """The attention of a block that lost every head: its output is the output projection's bias (or zero).

    The attention's submodules (the zero-width projections, and any others such as q/k norms) stay under their
    names, so the state dict keeps the stock layout. With a KV cache, a one-channel placeholder is stored for
    every token, so that the cache's sequence length (which the masks and positions of the next generation step
    are computed from) stays right.
    """

    def __init__(self, modules: dict[str, nn.Module], output_projection: str, layer_idx: int | None) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self.output_projection = output_projection
        self.layer_idx = layer_idx

    def forward(
        self,
        hidden_states: torch.Tensor,
        *args: Any,
        past_key_values: Any = None,
        cache: Any = None,
        layer_past: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        projection = getattr(self, self.output_projection)
        # Calling the zero-input-width projection (rather than reading its bias) runs its hooks, so offloading
        # and adapters behave as for any other linear.
        output = projection(hidden_states.new_zeros((*hidden_states.shape[:-1], 0)))
        # The cache argument's name: `cache` (newer transformers), `past_key_values` (older), `layer_past` (GPT-NeoX).
        cache = next((c for c in (cache, past_key_values, layer_past) if c is not None), None)
        if cache is not None and self.layer_idx is not None:
            placeholder = hidden_states.new_zeros((hidden_states.shape[0], 1, hidden_states.shape[1], 1))
            cache.update(placeholder, placeholder, self.layer_idx)
        return output, None


def _linear(root: nn.Module, path: str) -> nn.Linear:
    module = root.get_submodule(path)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"osscar_layout names {path!r}, which is a {type(module).__name__}, not an nn.Linear")
    return module


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Keep the outputs ``rows`` of ``linear``."""
    if rows.numel() == linear.out_features:
        return
    rows = rows.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(0, rows), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.index_select(0, rows), requires_grad=linear.bias.requires_grad)
    linear.out_features = int(rows.numel())


def _keep_columns(linear: nn.Linear, count: int) -> None:
    """Keep the first ``count`` inputs of ``linear``."""
    if count == linear.in_features:
        return
    weight = linear.weight[:, :count].clone(memory_format=torch.contiguous_format)
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    linear.in_features = count


def _set_counts(block: nn.Module, counts_at: dict[str, str], counts: dict[str, int]) -> None:
    for path, kind in counts_at.items():
        owner, _, attribute = count_owner(block, path)
        if isinstance(owner, OsscarEmptyAttention):
            continue
        try:
            set_count(block, path, counts[kind])
        except AttributeError:
            raise AttributeError(
                f"osscar_layout['count_attributes'] names {path!r}, but the module has no {attribute!r}"
            ) from None


def _producers(root: nn.Module, entries: list[Any], kind: str, built: int, kept: int,
               n_rep: int, head_dim: int, per_group: int | None = None) -> list[tuple[nn.Linear, torch.Tensor]]:
    """Every producer of a part with the rows its first ``kept`` structures (of ``built``) own; for the attention,
    the first ``per_group`` query heads of each kept KV group (all when None)."""
    out = []
    keep = torch.arange(kept, device="cpu")
    heads = kept_query_heads(keep, n_rep, per_group) if kind == "q" else None
    for path, segments, interleaved in producer_entries(entries, kind):
        linear = _linear(root, path)
        if linear.out_features != built * structure_stride(segments, n_rep, head_dim):
            raise ValueError(f"osscar_layout: {path!r} has {linear.out_features} outputs, which its row layout "
                             f"{list(segments)} does not split into {built} structures")
        out.append((linear, kept_rows(segments, interleaved, keep, built, n_rep, head_dim, heads)))
    return out


def _expert_tensor(block: nn.Module, path: str) -> tuple[nn.Module, str, torch.Tensor]:
    """(module, name, 3-D per-expert tensor) of a mixture of experts' parameter at ``path`` from the block."""
    owner, _, name = path.rpartition(".")
    module = block.get_submodule(owner)
    tensor = getattr(module, name, None)
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        raise ValueError(f"osscar_layout names {path!r} as a per-expert tensor, but the block has none there")
    return module, name, tensor


def _keep_expert_neurons(block: nn.Module, layout: dict[str, Any], built: int, kept: int) -> None:
    """Keep the first ``kept`` neurons (of ``built``) of every expert: their rows of each producer (its layout's
    :func:`kept_rows`) and the consumer's columns."""
    if kept == built:
        return
    keep = torch.arange(kept, device="cpu")
    for path, segments, interleaved in producer_entries(layout["mlp_producers"], "neurons"):
        module, name, tensor = _expert_tensor(block, path)
        rows = kept_rows(segments, interleaved, keep, built, 1, 1).to(tensor.device)
        new = tensor.index_select(1, rows).clone(memory_format=torch.contiguous_format)
        setattr(module, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
    module, name, tensor = _expert_tensor(block, layout["mlp_consumer"])
    new = tensor[:, :, :kept].clone(memory_format=torch.contiguous_format)
    setattr(module, name, nn.Parameter(new, requires_grad=tensor.requires_grad))


def resize_block(block: nn.Module, layout: dict[str, Any], shape: dict[str, int]) -> None:
    """Shrink one decoder block to ``shape`` (see the module docstring)."""
    n_rep, head_dim = layout["n_rep"], layout["head_dim"]
    attention = block.get_submodule(layout["attention"])
    experts = layout.get("experts")  # a mixture of experts: the MLP's producers and consumer are 3-D tensors
    o_proj = _linear(attention, layout["o_proj"])
    consumer = None if experts else _linear(block, layout["mlp_consumer"])
    heads, kv_heads, ffn_dim = shape["num_attention_heads"], shape["num_key_value_heads"], shape["ffn_dim"]
    built_ffn = _expert_tensor(block, layout["mlp_consumer"])[2].shape[2] if experts else consumer.in_features
    built = {"num_key_value_heads": o_proj.in_features // (n_rep * head_dim), "ffn_dim": built_ffn}
    if kv_heads > built["num_key_value_heads"] or ffn_dim > built["ffn_dim"]:
        raise ValueError(
            f"cannot shrink a block built with {built} to {shape}: the stock fields of the config and "
            "osscar_block_shapes disagree"
        )
    per_group = heads // kv_heads if kv_heads else n_rep
    producers = _producers(attention, layout["attention_producers"], "q", built["num_key_value_heads"], kv_heads,
                           n_rep, head_dim, per_group)
    if experts:
        _keep_expert_neurons(block, layout, built["ffn_dim"], ffn_dim)
    else:
        producers += _producers(block, layout["mlp_producers"], "neurons", built["ffn_dim"], ffn_dim, 1, 1)
        _keep_columns(consumer, ffn_dim)
    for linear, rows in producers:
        _keep_rows(linear, rows)
    _keep_columns(o_proj, heads * head_dim)
    if kv_heads == 0:
        empty = OsscarEmptyAttention(dict(attention.named_children()), layout["o_proj"],
                                     getattr(attention, "layer_idx", None))
        parent_path, _, name = layout["attention"].rpartition(".")
        setattr(block.get_submodule(parent_path), name, empty)
    counts = {"heads": heads, "kv_heads": kv_heads, "n_rep": per_group, "ffn": ffn_dim}
    _set_counts(block, layout.get("count_attributes", {}), counts)
    if layout.get("shared_expert") is not None:
        _shrink_shared_expert(block, layout["shared_expert"], shape["shared_ffn_dim"])


def _shrink_shared_expert(block: nn.Module, shared: dict[str, Any], width: int) -> None:
    """Keep the first ``width`` neurons of a mixture of experts' shared expert (a dense MLP of linears)."""
    consumer = _linear(block, shared["consumer"])
    if width > consumer.in_features:
        raise ValueError(f"cannot grow the shared expert of {consumer.in_features} neurons to {width}: the stock "
                         "fields of the config and osscar_block_shapes disagree")
    for path in shared["producers"]:
        _keep_rows(_linear(block, path), torch.arange(width, device="cpu"))
    _keep_columns(consumer, width)
    _set_counts(block, {path: "ffn" for path in shared["count_attributes"]}, {"ffn": width})


def apply_block_shapes(model: nn.Module, config: OsscarLlamaConfig) -> None:
    """Shrink every decoder block of ``model`` to ``config.osscar_block_shapes`` (nothing when unset)."""
    shapes = config.osscar_block_shapes
    if shapes is None:
        return
    blocks = model.get_submodule(config.osscar_layout["blocks"])
    if len(blocks) != len(shapes):
        raise ValueError(f"osscar_block_shapes lists {len(shapes)} blocks but the model has {len(blocks)}")
    for block, shape in zip(blocks, shapes, strict=True):
        resize_block(block, config.osscar_layout, shape)


def register_checkpoint_renames(class_name: str, renames: dict[str, str] | None, base: str | None = None) -> None:
    """Have transformers rename the checkpoint's tensors for the class ``class_name`` on load (and back on save):
    ``renames`` maps a prefix in the checkpoint to one in the model (``osscar_layout["checkpoint_renames"]``;
    GPT-NeoX's ``embed_out.`` -> ``lm_head.``); with ``base`` (a mixture of experts' stock ``model_type``), the stock
    family's own conversions too (each expert's tensors stacked into the fused parameters). transformers applies the
    stock family's conversions to the stock class only, never to custom code. A transformers without conversion
    mappings names the modules as the checkpoint does, and needs none."""
    if not renames and not base:
        return
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return
    mapping = [WeightRenaming(source_patterns="^" + old.replace(".", "\\."), target_patterns=new)
               for old, new in (renames or {}).items()]
    mapping += (get_checkpoint_conversion_mapping(base) or []) if base else []
    register_checkpoint_conversion_mapping(class_name, mapping, overwrite=True)


class OsscarLlamaForCausalLM(LlamaForCausalLM):
    """The family's ``*ForCausalLM`` with every decoder block at its pruned shape."""

    config_class = OsscarLlamaConfig

    def __init__(self, config: OsscarLlamaConfig) -> None:
        super().__init__(config)
        apply_block_shapes(self, config)
        # Before from_pretrained reads the checkpoint's names (it builds the model first).
        layout = config.osscar_layout or {}
        register_checkpoint_renames(type(self).__name__, layout.get("checkpoint_renames"),
                                    config.osscar_base_model_type if layout.get("experts") else None)


__all__ = ["OsscarEmptyAttention", "OsscarLlamaForCausalLM"]
