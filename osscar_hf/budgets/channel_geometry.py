"""What a CNN's residual blocks cost as a function of their inner widths: parameters, or multiply-adds per image.

A block's cost is a polynomial in the kept counts ``k_p`` of its channel problems (:mod:`osscar_hf.arch.vision`):
a convolution's weight is ``out * in / groups * kh * kw``, where ``in`` is a problem's width when the convolution
consumes it and ``out`` one when it produces it (a bottleneck's conv2 does both, hence a product ``k_a * k_b``); a
depthwise convolution and a batch norm scale with the one width they carry; every other module of the block (the
shortcut, the last batch norm) is a constant. Multiply-adds count convolutions and linears only, at their output
positions on one image of the calibration size (as :func:`osscar_hf.conv_flops.count_multiply_adds` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..arch import get_submodule
from ..channel_surgery import consumer_ops
from ..errors import UnsupportedModelError

__all__ = ["ChannelGeometry", "CostTerm", "channel_geometries"]

TARGETS = ("params", "flops")


@dataclass(frozen=True)
class CostTerm:
    """``coef * k[first] * k[second]``, a missing index standing for 1."""

    coef: float
    first: int | None = None
    second: int | None = None

    def value(self, kept: Sequence[int]) -> float:
        value = self.coef
        for index in (self.first, self.second):
            if index is not None:
                value *= kept[index]
        return value


@dataclass(frozen=True)
class ChannelGeometry:
    """One block's cost: ``constant + sum of terms`` at kept inner widths ``kept`` (one per channel problem)."""

    widths: tuple[int, ...]
    constant: float
    terms: tuple[CostTerm, ...]

    def cost(self, kept: Sequence[int]) -> float:
        return self.constant + sum(term.value(kept) for term in self.terms)

    @property
    def dense(self) -> float:
        return self.cost(self.widths)

    def unit(self, kept: Sequence[int], problem: int) -> float:
        """What one channel of ``problem`` costs at ``kept`` (exact: the cost is linear in each width alone)."""
        fewer = list(kept)
        fewer[problem] -= 1
        return self.cost(kept) - self.cost(fewer)


def channel_geometries(model: nn.Module, spec: Any, target: str, pixels: torch.Tensor | None = None
                       ) -> list[ChannelGeometry]:
    """Every residual block's :class:`ChannelGeometry` for ``target`` (``"params"`` or ``"flops"``: multiply-adds
    on ``pixels``, one image at the calibration size)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    paths = spec.block_paths(model)
    blocks = [get_submodule(model, path) for path in paths]
    positions = _output_positions(model, blocks, pixels) if target == "flops" else {}
    return [_block_geometry(block, spec.layout(block), target, positions) for block in blocks]


def _output_positions(model: nn.Module, blocks: list[nn.Module], pixels: torch.Tensor | None) -> dict[int, int]:
    """Output positions per image of every convolution and linear in ``blocks`` (by ``id``), from one forward."""
    from ..conv_flops import probe_pixels

    positions: dict[int, int] = {}

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        positions[id(module)] = output[0].numel() // width

    modules = [m for block in blocks for m in block.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(pixel_values=probe_pixels(model, pixels).to(device))
    finally:
        for handle in handles:
            handle.remove()
    return positions


def _roles(block: nn.Module, problems: Sequence[Any]) -> tuple[dict[int, int], dict[int, int]]:
    """Module id -> the problem whose channels it consumes (inputs), and -> the one whose channels it produces."""
    consumes, produces = {}, {}
    for p, problem in enumerate(problems):
        consumes[id(get_submodule(block, problem.consumer))] = p
        for path in problem.producers:
            produces[id(get_submodule(block, path))] = p
    return consumes, produces


def _block_geometry(block: nn.Module, problems: Sequence[Any], target: str, positions: dict[int, int]
                    ) -> ChannelGeometry:
    consumes, produces = _roles(block, problems)
    consumers = [get_submodule(block, problem.consumer) for problem in problems]
    widths = [consumer_ops(consumer).width(consumer) for consumer in consumers]
    constant, terms = 0.0, []
    for module in block.modules():
        inner = consumes.get(id(module)), produces.get(id(module))
        if inner == (None, None):
            constant += _fixed_cost(module, target, positions)
        else:
            terms += _module_terms(module, *inner, target, positions)
    return ChannelGeometry(tuple(widths), constant, tuple(t for t in terms if t.coef))


def _fixed_cost(module: nn.Module, target: str, positions: dict[int, int]) -> float:
    if target == "params":
        return float(sum(p.numel() for p in module.parameters(recurse=False)))
    if isinstance(module, (nn.Conv2d, nn.Linear)):  # a convolution's weight: out * in / groups * kh * kw
        return float(positions[id(module)] * module.weight.numel())
    return 0.0


def _module_terms(module: nn.Module, consumed: int | None, produced: int | None, target: str,
                  positions: dict[int, int]) -> list[CostTerm]:
    """The cost terms of a module whose input (``consumed``) or output (``produced``) channels are inner widths."""
    flops = target == "flops"
    if isinstance(module, nn.Conv2d):
        kernel = module.kernel_size[0] * module.kernel_size[1]
        scale = positions[id(module)] if flops else 1
        if module.groups > 1:  # depthwise: each channel its own group, sliced with its producer's width
            terms = [CostTerm(float(scale * kernel), produced)]
        else:
            inputs = 1 if consumed is not None else module.in_channels
            outputs = 1 if produced is not None else module.out_channels
            terms = [CostTerm(float(scale * kernel * inputs * outputs), consumed, produced)]
        if not flops and module.bias is not None:
            terms.append(CostTerm(1.0 if produced is not None else float(module.out_channels), produced))
        return terms
    if isinstance(module, nn.Linear):
        scale = positions[id(module)] if flops else 1
        inputs = 1 if consumed is not None else module.in_features
        outputs = 1 if produced is not None else module.out_features
        terms = [CostTerm(float(scale * inputs * outputs), consumed, produced)]
        if not flops and module.bias is not None:
            terms.append(CostTerm(1.0 if produced is not None else float(module.out_features), produced))
        return terms
    if isinstance(module, nn.BatchNorm2d) and consumed is None:
        return [] if flops else [CostTerm(float(len(list(module.parameters(recurse=False)))), produced)]
    raise UnsupportedModelError(f"cannot count the cost of a {type(module).__name__} on a block's inner channels")
