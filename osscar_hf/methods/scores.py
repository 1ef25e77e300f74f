"""Score-based baselines: keep the structures with the largest score, no refit.

- ``magnitude``: the L2 norm of the structure's consumer columns (no calibration data needed).
- ``wanda_sp``: structured Wanda (An et al., 2024): the sum over the structure's consumer weights of
  ``|W_ij| * ||X_j||``, the weight magnitude times the input channel's activation norm.
- ``flap``: FLAP (An et al., AAAI 2024): the fluctuation ``Var(x_j) * ||W_:,j||^2`` of each input channel summed
  over the structure, and bias compensation: the pruned channels' mean contribution ``W_:,pruned E[x_pruned]`` is
  added to the consumer's bias, so the output keeps its mean. With a global ``sparsity`` FLAP allocates with its
  own rule (see :func:`osscar_hf.budgets.flap.flap_sizes`).
"""

from __future__ import annotations

import torch

from ..solver.sweep import channels_of
from .base import MOMENTS, LayerProblem, PruningMethod, Selection, group_sums, top_groups

__all__ = ["Flap", "Magnitude", "WandaSP"]


def _moments(problem: LayerProblem, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    stats = problem.statistics
    if stats.mean is None or stats.mean_square is None:
        raise ValueError(f"method {name!r} needs the per-channel moments of the layer's inputs")
    return stats.mean, stats.mean_square


class _ScoreMethod(PruningMethod):
    def select(self, problem: LayerProblem) -> Selection:
        scores = self.structure_scores(problem)
        return Selection(top_groups(scores, problem.num_keep, problem.partitions))


class Magnitude(_ScoreMethod):
    name = "magnitude"
    description = "L2 norm of each structure's consumer columns; no calibration data, no refit"

    def structure_scores(self, problem: LayerProblem) -> torch.Tensor:
        return group_sums(problem.weight.detach().double().pow(2).sum(0), problem.group_size)


class WandaSP(_ScoreMethod):
    name = "wanda_sp"
    description = "structured Wanda: sum of |weight| x input activation norm over the structure; no refit"
    statistics = frozenset({MOMENTS})

    def structure_scores(self, problem: LayerProblem) -> torch.Tensor:
        _, mean_square = _moments(problem, self.name)
        norms = mean_square.to(problem.weight.device).clamp_min(0).sqrt()
        return group_sums(problem.weight.detach().double().abs().sum(0) * norms, problem.group_size)


class Flap(_ScoreMethod):
    name = "flap"
    description = "FLAP: input fluctuation x squared column norm, with bias compensation; no refit"
    statistics = frozenset({MOMENTS})
    adds_bias = True
    allocation = "flap"

    def channel_scores(self, problem: LayerProblem) -> torch.Tensor:
        """Per input channel: the variance of the input over the calibration tokens times the squared column norm."""
        mean, mean_square = _moments(problem, self.name)
        variance = (mean_square - mean.pow(2)).clamp_min(0).to(problem.weight.device)
        return variance * problem.weight.detach().double().pow(2).sum(0)

    def structure_scores(self, problem: LayerProblem) -> torch.Tensor:
        return group_sums(self.channel_scores(problem), problem.group_size)

    def select(self, problem: LayerProblem) -> Selection:
        kept = top_groups(self.structure_scores(problem), problem.num_keep, problem.partitions)
        mean, _ = _moments(problem, self.name)
        weight = problem.weight.detach()
        pruned = torch.ones(problem.num_groups, dtype=torch.bool)
        pruned[kept] = False
        channels = channels_of(torch.nonzero(pruned).flatten(), problem.group_size).to(weight.device)
        shift = weight.double().index_select(1, channels) @ mean.to(weight.device).index_select(0, channels)
        base = problem.bias.detach().double() if problem.bias is not None else torch.zeros_like(shift)
        return Selection(kept, bias=(base + shift).to(weight.dtype))
