"""Per-block inner widths of a pruned CNN: read them, tell whether the stock config expresses them, apply them to a
skeleton before its weights load (:func:`osscar_hf.io.model_config.update_channel_config` records them in the model's
config).

An entry of ``OsscarConfig.block_shapes`` for a CNN block is ``{"channels": [width, ...]}``: the kept input channels
of each of its channel problems, in the order they are solved (see :mod:`osscar_hf.arch.vision`). No transformers
CNN config has a field for a block's inner width (a ResNet bottleneck's is its output width / 4, a basic block's its
output width, an inverted residual's ``make_divisible(in * expand_ratio)``), so a pruned CNN always travels in the
osscar format.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..arch import get_submodule
from ..arch.vision import VisionSpec, get_vision_spec
from ..channel_surgery import consumer_ops, keep_input_channels, keep_output_channels
from ..config import CHANNEL_SHAPE_KEY
from ..errors import OsscarError

__all__ = ["apply_channel_shapes", "channel_shapes_expressed", "dense_channel_shapes", "read_channel_shapes"]


def _block_widths(spec: VisionSpec, block: nn.Module) -> list[int]:
    consumers = [get_submodule(block, problem.consumer) for problem in spec.layout(block)]
    return [consumer_ops(consumer).width(consumer) for consumer in consumers]


def read_channel_shapes(model: nn.Module) -> list[dict[str, list[int]]]:
    """Every block's ``{"channels": inner widths}``, read from its modules."""
    spec = get_vision_spec(model)
    return [{CHANNEL_SHAPE_KEY: _block_widths(spec, get_submodule(model, path))} for path in spec.block_paths(model)]


def dense_channel_shapes(config: Any) -> list[dict[str, list[int]]]:
    """The shapes of a stock model built from ``config`` (a skeleton on the meta device: no weight is made)."""
    from transformers import AutoModelForImageClassification

    with torch.device("meta"):
        skeleton = AutoModelForImageClassification.from_config(config)
    return read_channel_shapes(skeleton)


def channel_shapes_expressed(config: Any, shapes: list[dict[str, Any]]) -> bool:
    """Whether a stock model built from ``config`` has exactly ``shapes`` (only when nothing was pruned)."""
    return dense_channel_shapes(config) == shapes


def apply_channel_shapes(model: nn.Module, shapes: list[dict[str, Any]]) -> None:
    """Shrink every block of ``model`` (a skeleton built from the stock config, usually on meta) to ``shapes``: each
    problem's consumer and producers keep their first ``width`` channels, which the checkpoint's weights then fill."""
    spec = get_vision_spec(model)
    paths = spec.block_paths(model)
    if len(shapes) != len(paths):
        raise OsscarError(f"the checkpoint lists channel widths for {len(shapes)} blocks but the model has "
                          f"{len(paths)} blocks")
    with torch.device("cpu"):  # the kept indices on the CPU, also under transformers' meta context
        for i, (path, shape) in enumerate(zip(paths, shapes)):
            block = get_submodule(model, path)
            problems = spec.layout(block)
            widths = shape.get(CHANNEL_SHAPE_KEY) if isinstance(shape, dict) else None
            if not isinstance(widths, list) or len(widths) != len(problems):
                raise OsscarError(f"block_shapes[{i}] must be {{{CHANNEL_SHAPE_KEY!r}: {len(problems)} widths}} for "
                                  f"{path} (a {type(block).__name__}), got {shape!r}")
            for problem, width in zip(problems, widths):
                kept = torch.arange(width)
                for producer in problem.producers:
                    keep_output_channels(get_submodule(block, producer), kept)
                keep_input_channels(get_submodule(block, problem.consumer), kept)
