"""The swept system: one matrix that holds everything stages A and B need for the current support.

For a support S (kept channels) and its complement U, the *swept* form of ``[Hb | Gb]`` is the
``(p, p + q)`` matrix (rows and columns in the original channel order)::

    B[S, S] = -Hb_SS^{-1}                       B[S, V] = W_S = Hb_SS^{-1} Gb_S   (the refit)
    B[S, U] =  Hb_SS^{-1} Hb_SU                 B[U, V] = Gb_U - Hb_US W_S        (residual gradient)
    B[U, U] =  Hb_UU - Hb_US Hb_SS^{-1} Hb_SU   (Schur complement)

(``V`` are the last q columns.) Both scores of ALGORITHM.md are then the same formula on the diagonal
blocks of B: for a kept group j, ``1/2 tr(W_j^T [Hinv_SS]_jj^{-1} W_j)`` is the exact increase of f when j
alone is removed (``-B_jj`` is ``[Hinv_SS]_jj``); for a pruned group i, ``B_ii`` is the Schur complement
``C_i`` and ``B[i, V]`` is ``g_i``, so the same formula is the exact gain of adding i back.

A Schur block is ``>= lam I`` in exact arithmetic, but with little damping float32 rounding can leave one
not positive definite (its group is then, to working precision, a combination of the kept ones). Such a
group is left out of both selections rather than stopping the solve: it is never removed (it is not kept)
and never added back (its gain is ``-inf``), so no pivot ever has to factor its block. A kept group's block
``-B_jj`` that is not positive definite still raises SolverError.

Moving a set of channels T into or out of S at once is one *principal pivot* of B (the classical sweep
operator, Goodnight 1979): a rank-|T| update of the whole matrix, so removals, additions and a mixed swap
all cost one rank-|T| product. The objective change of a pivot is known before it is applied, from |T|
rows of B only, which is what lets stage B reject a swap for free. The initial system, every channel
kept, is ``[-Hb^{-1} | Hb^{-1} Gb]`` (built by :func:`~osscar_hf.solver.problem.damped_inverse_`).

Storage (:class:`SweptSystem`): the ``p x p`` part of B is symmetric, so only its lower triangle is kept,
in the lower triangle of a ``p x p`` buffer whose strict upper triangle holds the Gram matrix H, untouched
(see :mod:`.packed`); the value columns are a separate ``(p, q)`` tensor. The whole solve therefore works
in one ``p x p`` buffer, which can be H's own storage, plus ``O(p q)``.

Why the full matrix rather than ``Hb_SS^{-1}`` compressed to the kept channels: stage B needs the Schur
and residual rows of the pruned channels anyway (with a compressed inverse every round would cost
``O(|S|^2 |U|)`` to rebuild them), and a rank-t update of the triangle touches each value once. Rows and
columns of removed channels never need zeroing: the pivot turns them into exactly those Schur/residual
rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from osscar_hf.errors import SolverError
from osscar_hf.solver.packed import (
    lower_diagonal_blocks,
    lower_update_,
    lower_update_scratch,
    symmetric_rows,
    write_symmetric_rows_,
)

__all__ = [
    "PreparedPivot",
    "SweptSystem",
    "apply_pivot",
    "channels_of",
    "dense_system",
    "diagonal_blocks",
    "group_scores",
    "group_values",
    "invert_pivot_block",
    "prepare_pivot",
    "removal_scores",
]

NOT_PD_ADVICE = (
    "raise `damping` (for example 10x), solve in float64 (`dtype=torch.float64`), "
    "or check the calibration data for near-duplicate or constant input channels"
)


@dataclass
class SweptSystem:
    """The swept system B in one ``p x p`` buffer plus its value columns.

    ``packed``: row-major ``(p, p)``; lower triangle and diagonal = the ``p x p`` part of B; strict upper
    triangle = H, never written here. ``values``: ``(p, q)`` = ``B[:, V]`` (``q`` may be 0). ``scratch``:
    a small buffer that every pivot reuses (created by the first one).
    """

    packed: torch.Tensor
    values: torch.Tensor
    scratch: torch.Tensor | None = None  # reused by every pivot's triangular update (lower_update_scratch)


def dense_system(system: SweptSystem) -> torch.Tensor:
    """The full ``(p, p + q)`` matrix B (a copy: for tests and debugging, not for the solver's hot paths)."""
    lower = system.packed.tril()
    return torch.cat([lower + lower.tril(-1).T, system.values], dim=1)


def channels_of(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Input-channel indices (int64) of the given group indices, group by group."""
    offsets = torch.arange(group_size, device=groups.device, dtype=torch.int64)
    return (groups.to(torch.int64).unsqueeze(1) * group_size + offsets).reshape(-1)


def diagonal_blocks(system: SweptSystem, group_size: int) -> torch.Tensor:
    """The ``(m, g, g)`` diagonal group blocks of the ``p x p`` part of B (a view for ``g = 1``)."""
    return lower_diagonal_blocks(system.packed, group_size)


def group_values(system: SweptSystem, group_size: int) -> torch.Tensor:
    """Zero-copy ``(m, g, q)`` view of the value columns (W rows or residual rows) of B, per group."""
    return system.values.unflatten(0, (system.values.shape[0] // group_size, group_size))


def group_scores(
    blocks: torch.Tensor, values: torch.Tensor, *, not_positive_definite: float | None = None
) -> torch.Tensor:
    """``1/2 tr(V_j^T A_j^{-1} V_j)`` for positive-definite blocks ``A`` ``(n, g, g)`` and ``V`` ``(n, g, q)``.

    Batched over groups (a batched Cholesky for g > 1, in slices of groups so that no temporary as large as
    ``V`` is needed). A block that is not positive definite raises SolverError, or, when
    ``not_positive_definite`` is given, gets that value as its score.
    """
    if blocks.shape[0] == 0:
        return blocks.new_zeros(0)
    if blocks.shape[-1] == 1:
        diag = blocks[:, 0, 0]
        failed = diag <= 0
        if bool(failed.any()):
            if not_positive_definite is None:
                raise SolverError(f"a diagonal entry of the swept Gram matrix is not positive; {NOT_PD_ADVICE}")
            diag = diag.masked_fill(failed, 1.0)
        scores = 0.5 * torch.linalg.vector_norm(values, dim=(1, 2)).square() / diag
        return scores if not_positive_definite is None else scores.masked_fill(failed, not_positive_definite)
    factor, info = torch.linalg.cholesky_ex(blocks)
    failed = info != 0
    if bool(failed.any()):
        if not_positive_definite is None:
            raise SolverError(
                f"a diagonal group block of the swept Gram matrix is not positive definite; {NOT_PD_ADVICE}"
            )
        eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
        factor = torch.where(failed[:, None, None], eye, factor)
    per_slice = max(1, (1 << 22) // max(1, values[0].numel()))
    scores = [
        torch.linalg.vector_norm(torch.linalg.solve_triangular(f, v, upper=False), dim=(1, 2)).square()
        for f, v in zip(factor.split(per_slice), values.split(per_slice))
    ]
    scores = 0.5 * torch.cat(scores)
    return scores if not_positive_definite is None else scores.masked_fill(failed, not_positive_definite)


def removal_scores(system: SweptSystem, kept: torch.Tensor, group_size: int) -> torch.Tensor:
    """Exact increase of f when each kept group alone is removed; ``+inf`` for pruned groups.

    For kept j, ``-B_jj = [Hb_SS^{-1}]_jj`` and ``B[j, V] = W_j``; such a block that is not positive
    definite means the swept system itself is broken, and raises SolverError. Pruned groups hold Schur blocks,
    which are never factored here (an identity block stands in): one that float32 rounding left not positive
    definite is treated as in :func:`~osscar_hf.solver.local_search.gains_after_drop`, by leaving its group
    out of the selection, which for a removal it already is.
    """
    packed = system.packed
    blocks = diagonal_blocks(system, group_size)
    eye = torch.eye(group_size, dtype=packed.dtype, device=packed.device)
    blocks = torch.where(kept[:, None, None], -blocks, eye)
    scores = group_scores(blocks, group_values(system, group_size))
    return scores.masked_fill(~kept, float("inf"))


@dataclass
class PreparedPivot:
    """A pivot on channels ``channels`` whose objective change ``delta`` is known but not yet applied."""

    channels: torch.Tensor  # (t,) int64
    sign: torch.Tensor  # (t,) -1 for channels leaving S, +1 for channels entering S, in B's dtype
    rows: torch.Tensor  # (t, p) copy of B[channels, :p]
    row_values: torch.Tensor  # (t, q) copy of B[channels, V]
    block_inverse: torch.Tensor  # (t, t) B[channels, channels]^{-1}
    delta: float  # f(after) - f(before)


def invert_pivot_block(block: torch.Tensor, sign: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(block^{-1}, info)``; ``info`` is 0 on success, else the order of the failing leading minor.

    When all signs agree ``sign * block`` is positive definite and is inverted by Cholesky; a mixed swap
    block is symmetric quasi-definite (nonsingular) and is inverted by LU.
    """
    if bool((sign == sign[0]).all()):
        s = float(sign[0])
        factor, info = torch.linalg.cholesky_ex(block * s)
        if int(info) != 0:
            return block, int(info)
        return torch.cholesky_inverse(factor) * s, 0
    inverse, info = torch.linalg.inv_ex(block)
    return inverse, int(info)


def prepare_pivot(system: SweptSystem, channels: torch.Tensor, sign: torch.Tensor) -> PreparedPivot:
    """Factor the pivot block of ``channels`` and compute the exact change of f, without touching B."""
    rows = symmetric_rows(system.packed, channels)
    row_values = system.values.index_select(0, channels)
    block = rows.index_select(1, channels)
    block_inverse, info = invert_pivot_block(block, sign)
    if info != 0:
        if bool((sign == sign[0]).all()):
            raise SolverError(f"a block of the swept Gram matrix is not positive definite; {NOT_PD_ADVICE}")
        raise SolverError(f"a swap block of the swept Gram matrix is singular; {NOT_PD_ADVICE}")
    delta = -0.5 * float((row_values * (block_inverse @ row_values)).sum())
    return PreparedPivot(channels, sign, rows, row_values, block_inverse, delta)


def apply_pivot(system: SweptSystem, pivot: PreparedPivot) -> None:
    """Apply a prepared principal pivot to B in place (a rank-|T| update of the triangle and the values).

    With ``Y = B_TT^{-1} B_T,:`` and s the signs: ``B_xy -= B_xT Y_y`` off T, ``B_T,: = s * Y``,
    ``B_:,T = (s * Y)^T`` and ``B_TT = -s B_TT^{-1} s``.
    """
    packed, values = system.packed, system.values
    ch, s = pivot.channels, pivot.sign
    solved = pivot.block_inverse @ pivot.rows
    if system.scratch is None:
        system.scratch = lower_update_scratch(packed.shape[0], packed.dtype, packed.device)
    lower_update_(packed, pivot.rows, solved, alpha=-1.0, scratch=system.scratch)
    new_values = pivot.block_inverse @ pivot.row_values
    if values.shape[1]:
        values.addmm_(pivot.rows.T, new_values, alpha=-1.0)
    new_rows = solved.mul_(s[:, None])
    block = -(s[:, None] * pivot.block_inverse * s[None, :])
    new_rows[:, ch] = 0.5 * (block + block.T)  # exactly symmetric (LU inverses of swap blocks are not)
    write_symmetric_rows_(packed, ch, new_rows)
    values.index_copy_(0, ch, new_values.mul_(s[:, None]))
