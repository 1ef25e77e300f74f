"""Per-block shapes of a pruned model: read them, tell whether the stock config expresses them, apply them.

A pruned model whose blocks all have the shape its (updated) stock config declares is a plain model of a
smaller size: vanilla transformers builds and loads it. Otherwise the shapes travel in
``config.quantization_config`` (an :class:`~osscar_hf.config.OsscarConfig` with ``block_shapes``), and the
osscar quantizer resizes the skeleton to them before the weights load; or, in the remote-code format, in
``config.osscar_block_shapes``, read by the modeling code saved beside the weights (see
:mod:`osscar_hf.io.remote_code`).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn

from ..arch import ArchSpec, get_spec, get_submodule
from ..arch.vision import is_vision_model
from ..config import QUANT_METHOD, OsscarConfig
from ..errors import OsscarError
from ..surgery import block_shape, resize_block
from .remote_code import base_model_type

__all__ = [
    "apply_block_shapes",
    "config_block_shape",
    "osscar_quantization_config",
    "read_block_shapes",
    "spec_of",
    "stock_config_expresses",
]


def spec_of(model_or_config: Any) -> ArchSpec:
    """:func:`osscar_hf.arch.get_spec`, also for a model loaded from a remote-code checkpoint (whose
    ``model_type`` is ``osscar_<family>``): the spec of its stock family."""
    config = getattr(model_or_config, "config", model_or_config)
    return get_spec(SimpleNamespace(model_type=base_model_type(config)))


def read_block_shapes(model: nn.Module, spec: ArchSpec | None = None) -> list[dict[str, int]]:
    """Every decoder block's ``num_attention_heads``, ``num_key_value_heads`` and ``ffn_dim``, read from its weights
    (a CNN's blocks: their inner widths, see :mod:`.channel_shapes`)."""
    if spec is None and is_vision_model(model):
        from .channel_shapes import read_channel_shapes

        return read_channel_shapes(model)
    spec = spec or spec_of(model)
    _, n_rep, head_dim = spec.group_geometry(model.config)
    return [block_shape(block, spec, n_rep=n_rep, head_dim=head_dim) for block in get_submodule(model, spec.blocks)]


def config_block_shape(config: Any, spec: ArchSpec | None = None) -> dict[str, int]:
    """The block shape a stock model built from ``config`` has."""
    spec = spec or spec_of(config)
    kv, n_rep, _ = spec.group_geometry(config)
    shape = {"num_key_value_heads": kv, "num_attention_heads": kv * n_rep, "ffn_dim": spec.ffn_dim(config)}
    shared = spec.shared_expert_spec()
    if shared is not None:
        shape["shared_ffn_dim"] = shared.ffn_dim(config)
    return shape


def stock_config_expresses(config: Any, shapes: list[dict[str, int]], spec: ArchSpec | None = None) -> bool:
    """Whether a stock model built from ``config`` has exactly ``shapes`` (so no osscar metadata is needed)."""
    if spec is None and is_vision_model(config):
        from .channel_shapes import channel_shapes_expressed

        return channel_shapes_expressed(config, shapes)
    implied = config_block_shape(config, spec)
    return all(shape == implied for shape in shapes)


def osscar_quantization_config(config: Any) -> OsscarConfig | None:
    """The :class:`OsscarConfig` in ``config.quantization_config`` (a dict is parsed), or ``None`` if absent.

    Raises ``OsscarError`` when the model is quantized by another method.
    """
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)
    if method != QUANT_METHOD:
        raise OsscarError(f"the model is quantized with {method!r}, not pruned by osscar_hf")
    return qc if isinstance(qc, OsscarConfig) else OsscarConfig.from_dict(qc)


def apply_block_shapes(model: nn.Module, shapes: list[dict[str, int]], spec: ArchSpec | None = None) -> None:
    """Resize every decoder block of ``model`` (built from the stock config, usually on meta) to ``shapes`` (a CNN's
    blocks: to their inner widths, see :mod:`.channel_shapes`)."""
    if spec is None and is_vision_model(model):
        from .channel_shapes import apply_channel_shapes

        apply_channel_shapes(model, shapes)
        return
    spec = spec or get_spec(model)
    blocks = get_submodule(model, spec.blocks)
    if len(shapes) != len(blocks):
        raise OsscarError(
            f"the checkpoint lists block shapes for {len(shapes)} blocks but the model has {len(blocks)} blocks"
        )
    _, n_rep, head_dim = spec.group_geometry(model.config)
    # transformers builds the skeleton under `torch.device("meta")`, which also puts the index tensors of
    # the slicing on meta; build those on the CPU (slicing a meta weight still gives a meta weight).
    with torch.device("cpu"):
        for block, shape in zip(blocks, shapes):
            resize_block(block, spec, shape, n_rep=n_rep, head_dim=head_dim)
