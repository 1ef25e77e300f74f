"""Stage A: greedy backward elimination with block downdates (ALGORITHM.md section 3).

Starting from the unconstrained optimum, remove the m - s groups in n = max(1, floor((m - s) / t)) steps
of about t groups each. Each step scores every kept group by the exact increase of f if it alone were
removed, removes the t cheapest together, and downdates the swept system (inverse and weights) with one
rank-t pivot, after which the weights are again the exact ridge refit on the new support.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from osscar_hf.solver.partitions import partition_ids, pick_within_quota
from osscar_hf.solver.sweep import (
    SweptSystem,
    apply_pivot,
    channels_of,
    prepare_pivot,
    removal_scores,
)

__all__ = ["EliminationResult", "eliminate", "elimination_schedule", "remove_groups"]


@dataclass
class EliminationResult:
    """What stage A leaves behind (the swept system itself is updated in place)."""

    kept: torch.Tensor  # (m,) bool mask of kept groups
    removal_order: torch.Tensor  # (m - s,) int64, in the order removed (cheapest first within a step)
    objective_curve: torch.Tensor  # (n + 1,) float64: f before the first step and after each step
    curve_num_kept: torch.Tensor  # (n + 1,) int64: number of kept groups at each point of the curve


def elimination_schedule(num_groups: int, num_keep: int, step: int) -> list[int]:
    """Sizes of the removal steps: n = max(1, floor((m - s) / t)) steps, as equal as possible, larger first."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if not 0 <= num_keep <= num_groups:
        raise ValueError(f"num_keep must be in [0, {num_groups}], got {num_keep}")
    to_remove = num_groups - num_keep
    if to_remove == 0:
        return []
    n = max(1, to_remove // step)
    base, extra = divmod(to_remove, n)
    return [base + 1] * extra + [base] * (n - extra)


def remove_groups(system: SweptSystem, groups: torch.Tensor, group_size: int) -> float:
    """Remove kept ``groups`` from the support (one block downdate of ``system``); return the increase of f."""
    channels = channels_of(groups, group_size)
    packed = system.packed
    sign = torch.full((channels.numel(),), -1.0, dtype=packed.dtype, device=packed.device)
    pivot = prepare_pivot(system, channels, sign)
    apply_pivot(system, pivot)
    return pivot.delta


def _cheapest(scores: torch.Tensor, kept: torch.Tensor, size: int, partitions: int, share: int) -> torch.Tensor:
    """The ``size`` kept groups of lowest removal score, none from a partition already down to its ``share``."""
    if partitions == 1:
        return torch.topk(scores, size, largest=False, sorted=True).indices
    ids = partition_ids(kept.numel(), partitions, kept.device)
    quota = torch.zeros(partitions, dtype=torch.int64, device=kept.device).index_add_(0, ids, kept.long()) - share
    return pick_within_quota(scores, ids, quota, size, largest=False)


def eliminate(
    system: SweptSystem, *, group_size: int, num_keep: int, step: int, objective_start: float, partitions: int = 1
) -> EliminationResult:
    """Run stage A in place on the swept system with every channel kept, ``[-Hb^{-1} | W_dense]``; with
    ``partitions`` (see :mod:`.partitions`) every partition ends with ``num_keep / partitions`` groups."""
    device = system.packed.device
    m = system.packed.shape[0] // group_size
    kept = torch.ones(m, dtype=torch.bool, device=device)
    removed: list[torch.Tensor] = []
    objective = objective_start
    curve = [objective]
    counts = [m]
    for size in elimination_schedule(m, num_keep, step):
        scores = removal_scores(system, kept, group_size)
        cheapest = _cheapest(scores, kept, size, partitions, num_keep // partitions)
        objective += remove_groups(system, cheapest, group_size)
        kept[cheapest] = False
        removed.append(cheapest)
        curve.append(objective)
        counts.append(counts[-1] - size)
    order = torch.cat(removed) if removed else torch.zeros(0, dtype=torch.int64, device=device)
    return EliminationResult(
        kept=kept,
        removal_order=order,
        objective_curve=torch.tensor(curve, dtype=torch.float64),
        curve_num_kept=torch.tensor(counts, dtype=torch.int64),
    )
