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

Moving a set of channels T into or out of S at once is one *principal pivot* of B (the classical sweep
operator, Goodnight 1979): a rank-|T| update of the whole matrix, so removals, additions and a mixed swap
all cost one ``addmm_``. The objective change of a pivot is known before it is applied, from |T| rows of
B only, which is what lets stage B reject a swap for free.

Why the full matrix rather than ``Hb_SS^{-1}`` compressed to the kept channels: stage B needs the Schur
and residual rows of the pruned channels anyway (with a compressed inverse every round would cost
``O(|S|^2 |U|)`` to rebuild them), and on the 2-core reference machine re-gathering a 1536 x 1536 float64
inverse (two ``index_select``) took ~8 ms against ~0.8 ms for a rank-10 ``addmm_`` on the whole
``p x (p + q)`` matrix. Rows and columns of removed channels never need zeroing: the pivot turns them
into exactly those Schur/residual rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from osscar_hf.errors import SolverError

__all__ = [
    "PreparedPivot",
    "apply_pivot",
    "channels_of",
    "diagonal_blocks",
    "group_scores",
    "group_values",
    "prepare_pivot",
    "removal_scores",
]

NOT_PD_ADVICE = (
    "raise `damping` (for example 10x), solve in float64 (`dtype=torch.float64`), "
    "or check the calibration data for near-duplicate or constant input channels"
)


def channels_of(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Input-channel indices (int64) of the given group indices, group by group."""
    offsets = torch.arange(group_size, device=groups.device, dtype=torch.int64)
    return (groups.to(torch.int64).unsqueeze(1) * group_size + offsets).reshape(-1)


def diagonal_blocks(B: torch.Tensor, group_size: int) -> torch.Tensor:
    """Zero-copy ``(m, g, g)`` view of the diagonal group blocks of the ``p x p`` part of ``B``."""
    if not B.is_contiguous():
        raise ValueError("the swept system must be a contiguous (p, p + q) tensor")
    p, width = B.shape
    g = group_size
    return B.as_strided((p // g, g, g), (g * width + g, width, 1), B.storage_offset())


def group_values(B: torch.Tensor, group_size: int) -> torch.Tensor:
    """Zero-copy ``(m, g, q)`` view of the value columns (W rows or residual rows) of ``B``, per group."""
    p = B.shape[0]
    return B[:, p:].unflatten(0, (p // group_size, group_size))


def group_scores(blocks: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``1/2 tr(V_j^T A_j^{-1} V_j)`` for positive-definite blocks ``A`` ``(n, g, g)`` and ``V`` ``(n, g, q)``.

    One batched Cholesky for all groups; no loop. Raises SolverError if a block is not positive definite.
    """
    if blocks.shape[0] == 0:
        return blocks.new_zeros(0)
    if blocks.shape[-1] == 1:
        diag = blocks[:, 0, 0]
        if bool((diag <= 0).any()):
            raise SolverError(f"a diagonal entry of the swept Gram matrix is not positive; {NOT_PD_ADVICE}")
        return 0.5 * values.square().sum(dim=(1, 2)) / diag
    factor, info = torch.linalg.cholesky_ex(blocks)
    if bool((info != 0).any()):
        raise SolverError(f"a diagonal group block of the swept Gram matrix is not positive definite; {NOT_PD_ADVICE}")
    whitened = torch.linalg.solve_triangular(factor, values, upper=False)
    return 0.5 * whitened.square().sum(dim=(1, 2))


def removal_scores(B: torch.Tensor, kept: torch.Tensor, group_size: int) -> torch.Tensor:
    """Exact increase of f when each kept group alone is removed; ``+inf`` for pruned groups.

    For kept j, ``-B_jj = [Hb_SS^{-1}]_jj`` and ``B[j, V] = W_j``. Pruned groups get an identity block so
    that a slightly indefinite Schur block (float32 drift) there can never stop the factorisation.
    """
    blocks = diagonal_blocks(B, group_size)
    eye = torch.eye(group_size, dtype=B.dtype, device=B.device)
    blocks = torch.where(kept[:, None, None], -blocks, eye)
    scores = group_scores(blocks, group_values(B, group_size))
    return scores.masked_fill(~kept, float("inf"))


@dataclass
class PreparedPivot:
    """A pivot on channels ``channels`` whose objective change ``delta`` is known but not yet applied."""

    channels: torch.Tensor  # (t,) int64
    sign: torch.Tensor  # (t,) -1 for channels leaving S, +1 for channels entering S, in B's dtype
    rows: torch.Tensor  # (t, p + q) copy of B[channels, :]
    block_inverse: torch.Tensor  # (t, t) B[channels, channels]^{-1}
    delta: float  # f(after) - f(before)


def prepare_pivot(B: torch.Tensor, channels: torch.Tensor, sign: torch.Tensor) -> PreparedPivot:
    """Factor the pivot block of ``channels`` and compute the exact change of f, without touching ``B``.

    ``sign`` is -1 for kept channels (being removed) and +1 for pruned ones (being added). When all signs
    agree ``sign * B_TT`` is positive definite and is inverted by Cholesky; a mixed swap block is
    symmetric quasi-definite (nonsingular) and is inverted by LU.
    """
    p = B.shape[0]
    rows = B.index_select(0, channels)
    block = rows.index_select(1, channels)
    uniform = bool((sign == sign[0]).all())
    if uniform:
        s = float(sign[0])
        factor, info = torch.linalg.cholesky_ex(block * s)
        if int(info) != 0:
            raise SolverError(f"a block of the swept Gram matrix is not positive definite; {NOT_PD_ADVICE}")
        block_inverse = torch.cholesky_inverse(factor) * s
    else:
        block_inverse, info = torch.linalg.inv_ex(block)
        if int(info) != 0:
            raise SolverError(f"a swap block of the swept Gram matrix is singular; {NOT_PD_ADVICE}")
    values = rows[:, p:]
    delta = -0.5 * float((values * (block_inverse @ values)).sum())
    return PreparedPivot(channels=channels, sign=sign, rows=rows, block_inverse=block_inverse, delta=delta)


def apply_pivot(B: torch.Tensor, pivot: PreparedPivot) -> None:
    """Apply a prepared principal pivot to ``B`` in place (one rank-|T| ``addmm_``).

    With ``Y = B_TT^{-1} B_T,:`` and s the signs: ``B_xy -= B_xT Y_y`` off T, ``B_T,: = s * Y``,
    ``B_:,T = (s * Y)^T`` and ``B_TT = -s B_TT^{-1} s``.
    """
    p = B.shape[0]
    ch, s = pivot.channels, pivot.sign
    solved = pivot.block_inverse @ pivot.rows
    B.addmm_(pivot.rows[:, :p].T, solved, alpha=-1.0)
    new_rows = solved.mul_(s[:, None])
    new_rows[:, ch] = -(s[:, None] * pivot.block_inverse * s[None, :])
    B.index_copy_(0, ch, new_rows)
    B[:, :p].index_copy_(1, ch, new_rows[:, :p].T)
