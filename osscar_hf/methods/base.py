"""What a pruning method is: the statistics it needs from the calibration forward, and how it selects.

A method sees one consumer layer at a time (the attention output projection or the MLP down projection of a
block) through a :class:`LayerProblem`: the consumer's weight, how its input channels group into structures,
how many structures to keep, and the :class:`LayerStatistics` the pipeline accumulated for it. It returns a
:class:`Selection`: the kept structures and, for methods that refit, the consumer's new weight (and, for
methods that compensate, its new bias). The pipeline slices producers and consumer from that; methods never
touch modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = [
    "GRAM", "MOMENTS", "LayerProblem", "LayerStatistics", "PruningMethod", "Selection", "SolveSettings", "group_sums",
    "top_groups",
]

# Names of the statistics a method may ask for (PruningMethod.statistics).
GRAM = "gram"        # H = X^T X / N (p x p, float32): second moments of the consumer's inputs
MOMENTS = "moments"  # E[x] and E[x^2] per input channel (p each, float64)


@dataclass(frozen=True)
class SolveSettings:
    """The OSSCAR solver's settings for one kind of consumer (taken from an OsscarConfig)."""

    step: int
    swap_size: int
    local_search_iters: int
    damping: float
    dtype: torch.dtype


@dataclass
class LayerStatistics:
    """What the calibration forward accumulated for one consumer's inputs (only what the method asked for).

    ``gram``: running mean ``X^T X / N`` (float32, see :func:`osscar_hf.solver.new_gram`); ``cross_gram``:
    ``X_pruned^T X_dense / N`` with dense targets; ``mean`` and ``mean_square``: ``E[x]`` and ``E[x^2]`` per input
    channel (float64); ``tokens``: N.
    """

    gram: torch.Tensor | None = None
    cross_gram: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    mean_square: torch.Tensor | None = None
    tokens: int = 0


@dataclass
class LayerProblem:
    """One consumer layer to prune: keep ``num_keep`` of its ``weight.shape[1] // group_size`` structures."""

    weight: torch.Tensor            # (out, p) as stored in the nn.Linear
    bias: torch.Tensor | None       # (out,) or None
    group_size: int                 # input channels per structure (1 for a neuron)
    num_keep: int
    statistics: LayerStatistics
    solve: SolveSettings
    # The structures split into this many equal, contiguous partitions, each keeping num_keep / partitions of its
    # structures (query heads inside KV groups); 1: a free selection.
    partitions: int = 1

    @property
    def num_groups(self) -> int:
        return self.weight.shape[1] // self.group_size


@dataclass
class Selection:
    """A method's answer for one layer.

    ``kept_groups``: sorted int64 indices of the kept structures. ``weight``: the consumer's new ``(out, kept
    channels)`` weight, or None to keep its original columns. ``bias``: the consumer's new bias, or None to leave
    it as it is. ``report``: figures for the pruning report (objectives, reconstruction errors, swaps, seconds),
    keys of :class:`osscar_hf.report.ConsumerReport`.
    """

    kept_groups: torch.Tensor
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    report: dict[str, Any] | None = None


class PruningMethod:
    """A selection method, registered by :attr:`name` (see :func:`osscar_hf.methods.register_method`).

    ``statistics``: what the pipeline must accumulate for :meth:`select` (:data:`GRAM`, :data:`MOMENTS`).
    ``refits``: whether the kept weights are re-fitted (then dense targets apply). ``adds_bias``: whether the
    consumers get an output bias (bias compensation), which the architecture must be able to hold.
    ``allocation``: the name of the global allocation a ``sparsity`` uses with ``allocation="global"`` (a key of
    :mod:`osscar_hf.pipeline.measure`'s allocations: ``"osscar"``, ``"flap"``), or None when the method has none
    (then only ``allocation="uniform"`` applies, and ``"global"`` is refused).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    statistics: ClassVar[frozenset[str]] = frozenset()
    refits: ClassVar[bool] = False
    adds_bias: ClassVar[bool] = False
    allocation: ClassVar[str | None] = None

    def select(self, problem: LayerProblem) -> Selection:  # pragma: no cover - abstract
        raise NotImplementedError

    def structure_scores(self, problem: LayerProblem) -> torch.Tensor:
        """Per-structure importance (larger = more important) for score-based methods."""
        raise NotImplementedError(f"method {self.name!r} has no structure scores")


def group_sums(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum of a per-channel vector ``(p,)`` over consecutive groups of ``group_size`` channels: ``(p // group_size,)``."""
    return values.reshape(-1, group_size).sum(1)


def top_groups(scores: torch.Tensor, num_keep: int, partitions: int = 1) -> torch.Tensor:
    """Sorted int64 indices (on the CPU) of the ``num_keep`` largest scores; ties go to the lower index. With
    ``partitions``, the ``num_keep / partitions`` largest of each of that many equal, contiguous partitions."""
    scores = scores.double().cpu()
    if partitions > 1:
        per_group = scores.reshape(partitions, -1)
        share = num_keep // partitions
        order = torch.sort(per_group, dim=1, descending=True, stable=True).indices[:, :share]
        kept = order + torch.arange(partitions).unsqueeze(1) * per_group.shape[1]
        return kept.reshape(-1).sort().values.to(torch.int64)
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:num_keep].sort().values.to(torch.int64)
