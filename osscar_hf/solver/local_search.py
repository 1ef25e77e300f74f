"""Stage B: local search by swaps (ALGORITHM.md section 4).

Each round drops the k kept groups with the lowest removal scores (set D), computes for every group
outside S \\ D its exact gain if added back to S \\ D (Schur complements, batched over groups), and adds
back the k best (set A). The round is accepted only if f strictly decreases; the first round that does
not improve ends the search (or, with ``halve_on_failure``, halves k and tries again).

The swept system makes a round cheap: the gains w.r.t. S \\ D need only the |D| rows of B (a rank-|D|
correction of the diagonal blocks and residual rows, never the whole matrix), the objective of the new
support (S \\ D) u A comes from the |T| rows of B with T = D xor A, and only an accepted round touches the
full matrix, with one rank-|T| pivot. A rejected round therefore costs nothing to undo.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from osscar_hf.errors import SolverError
from osscar_hf.solver.packed import symmetric_rows
from osscar_hf.solver.partitions import partition_ids
from osscar_hf.solver.sweep import (
    NOT_PD_ADVICE,
    SweptSystem,
    apply_pivot,
    channels_of,
    diagonal_blocks,
    group_scores,
    group_values,
    prepare_pivot,
    removal_scores,
)

__all__ = ["NOT_ADDABLE", "LocalSearchResult", "gains_after_drop", "local_search"]

NOT_ADDABLE = float("-inf")  # the gain of a group whose Schur block is not positive definite in working precision


@dataclass
class LocalSearchResult:
    """What stage B leaves behind (the swept system is updated in place to the final support)."""

    kept: torch.Tensor  # (m,) bool mask of kept groups
    objective: float  # f on the final support (tracked exactly by pivot deltas)
    swaps_accepted: int  # number of accepted rounds
    rounds: int  # number of rounds tried


def gains_after_drop(
    system: SweptSystem, kept: torch.Tensor, drop: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact gains of adding each group alone to ``S \\ drop``, for every group not in ``S \\ drop``.

    ``system`` is the swept system B for the support ``kept`` (which contains ``drop``); it is not modified.
    Returns ``(candidates, gains)``: the pruned groups followed by the dropped ones, and their gains
    ``1/2 tr(g_i^T C_i^{-1} g_i)`` with C_i and g_i taken w.r.t. ``S \\ drop``. A candidate whose Schur block
    C_i is not positive definite in working precision (float32 rounding; it is ``>= lam I`` in exact
    arithmetic) gets the gain ``-inf``: it cannot be added back (see :mod:`.sweep`). The kept block of
    ``drop`` must be positive definite (SolverError otherwise).
    """
    g = group_size
    k = drop.numel()
    pruned = torch.nonzero(~kept).flatten()
    drop_ch = channels_of(drop, g)

    drop_rows = symmetric_rows(system.packed, drop_ch)  # B_D,: (k g, p)
    drop_values = system.values.index_select(0, drop_ch)  # B_DV (k g, q)
    q_block = -drop_rows.index_select(1, drop_ch)  # [Hb_SS^{-1}]_DD, positive definite
    factor, info = torch.linalg.cholesky_ex(q_block)
    if int(info) != 0:
        raise SolverError(f"a block of the swept Gram matrix is not positive definite; {NOT_PD_ADVICE}")
    q_inverse = torch.cholesky_inverse(factor)  # = -B_DD^{-1}
    solved_values = q_inverse @ drop_values  # = -B_DD^{-1} B_DV

    # Pruned groups: B'_ii = B_ii - B_iD B_DD^{-1} B_Di and B'_iV = B_iV - B_iD B_DD^{-1} B_DV, a slice of
    # groups at a time (no temporary as large as the pruned rows of the values).
    u = pruned.numel()
    all_blocks = diagonal_blocks(system, g)
    all_values = group_values(system, g)
    per_slice = max(1, (1 << 20) // max(1, g * system.values.shape[1]))  # temporaries of about 1M values
    gains = []
    for i0 in range(0, u, per_slice):
        groups = pruned[i0:i0 + per_slice]
        n = groups.numel()
        cross = drop_rows.index_select(1, channels_of(groups, g))  # B_D,slice (k g, n g)
        solved_cross = q_inverse @ cross  # -B_DD^{-1} B_D,slice
        correction = torch.einsum("dia,dib->iab", cross.view(k * g, n, g), solved_cross.view(k * g, n, g))
        blocks = all_blocks.index_select(0, groups) + correction
        values = all_values.index_select(0, groups) + (cross.T @ solved_values).view(n, g, -1)
        gains.append(group_scores(blocks, values, not_positive_definite=NOT_ADDABLE))

    # Dropped groups, after leaving S: B'_DD = -B_DD^{-1} (Schur block) and B'_DV = -B_DD^{-1} B_DV.
    dropped_blocks = q_inverse.view(k, g, k, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    gains.append(group_scores(dropped_blocks, solved_values.view(k, g, -1), not_positive_definite=NOT_ADDABLE))
    return torch.cat([pruned, drop]), torch.cat(gains)


def _swap(kept: torch.Tensor, drop: torch.Tensor, add: torch.Tensor, group_size: int, dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(channels of T = D xor A, signs, new kept mask) of the swap of ``drop`` for ``add``, None when it is none."""
    new_kept = kept.clone()
    new_kept[drop] = False
    new_kept[add] = True
    leaving = torch.nonzero(kept & ~new_kept).flatten()
    entering = torch.nonzero(new_kept & ~kept).flatten()
    if leaving.numel() == 0:
        return None
    g = group_size
    channels = torch.cat([channels_of(leaving, g), channels_of(entering, g)])
    sign = torch.cat(
        [
            torch.full((leaving.numel() * g,), -1.0, dtype=dtype, device=kept.device),
            torch.full((entering.numel() * g,), 1.0, dtype=dtype, device=kept.device),
        ]
    )
    return channels, sign, new_kept


def _swap_round(
    system: SweptSystem, kept: torch.Tensor, k: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Choose D and A for one round; return (channels of T = D xor A, signs, new kept mask) or None."""
    scores = removal_scores(system, kept, group_size)
    drop = torch.topk(scores, k, largest=False, sorted=True).indices
    candidates, gains = gains_after_drop(system, kept, drop, group_size)
    best = torch.topk(gains, k, largest=True, sorted=True)
    if bool((best.values == NOT_ADDABLE).any()):
        return None  # fewer than k groups can be added back
    return _swap(kept, drop, candidates[best.indices], group_size, system.packed.dtype)


def _partition_rounds(
    system: SweptSystem, kept: torch.Tensor, k: int, group_size: int, partitions: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The swaps of one round under equal counts per partition: in each partition (the one holding the kept group
    of lowest removal score first), its ``k`` kept groups of lowest score for the ``k`` of its groups with the
    largest gains, w.r.t. the support without them."""
    scores = removal_scores(system, kept, group_size)
    ids = partition_ids(kept.numel(), partitions, kept.device)
    lowest = torch.full((partitions,), float("inf"), dtype=scores.dtype, device=scores.device)
    lowest.scatter_reduce_(0, ids, scores, reduce="amin")
    for p in torch.sort(lowest, stable=True).indices.tolist():
        inside = ids == p
        count = min(k, int((kept & inside).sum()))
        if count == 0:
            continue
        drop = torch.topk(scores.masked_fill(~inside, float("inf")), count, largest=False, sorted=True).indices
        candidates, gains = gains_after_drop(system, kept, drop, group_size)
        best = torch.topk(gains.masked_fill(ids[candidates] != p, NOT_ADDABLE), count, largest=True, sorted=True)
        if bool((best.values == NOT_ADDABLE).any()):
            continue  # fewer than count groups of the partition can be added back
        swap = _swap(kept, drop, candidates[best.indices], group_size, system.packed.dtype)
        if swap is not None:
            yield swap


def _proposals(
    system: SweptSystem, kept: torch.Tensor, k: int, group_size: int, partitions: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The swaps one round proposes, best first: one (free selection), or one per partition."""
    if partitions > 1:
        yield from _partition_rounds(system, kept, k, group_size, partitions)
        return
    proposal = _swap_round(system, kept, k, group_size)
    if proposal is not None:
        yield proposal


def local_search(
    system: SweptSystem,
    kept: torch.Tensor,
    *,
    group_size: int,
    swap_size: int,
    max_iters: int,
    objective_start: float,
    halve_on_failure: bool = False,
    partitions: int = 1,
) -> LocalSearchResult:
    """Run stage B on the swept system for the support ``kept`` (both updated in place). With ``partitions`` (see
    :mod:`.partitions`) a round swaps groups inside one partition: the partitions are tried in turn (the one
    holding the kept group of lowest removal score first) until a swap improves.

    A round is accepted only if it lowers f by more than a few ulps of |f|, so that rounding can never
    make the search cycle between supports of equal objective.
    """
    kept = kept.clone()
    s = int(kept.sum())
    m = kept.numel()
    objective = objective_start
    tolerance = 16.0 * torch.finfo(system.packed.dtype).eps
    k = min(swap_size, s)
    accepted = 0
    rounds = 0
    if s == 0 or s == m:
        return LocalSearchResult(kept=kept, objective=objective, swaps_accepted=0, rounds=0)
    while rounds < max_iters and k >= 1:
        rounds += 1
        improved = False
        for channels, sign, new_kept in _proposals(system, kept, k, group_size, partitions):
            pivot = prepare_pivot(system, channels, sign)
            if pivot.delta < -tolerance * abs(objective):
                apply_pivot(system, pivot)
                kept = new_kept
                objective += pivot.delta
                accepted += 1
                improved = True
                break
        if not improved:
            if halve_on_failure and k > 1:
                k //= 2
            else:
                break
    return LocalSearchResult(kept=kept, objective=objective, swaps_accepted=accepted, rounds=rounds)
