"""Symmetric matrices kept in one triangle of a square buffer, so that two of them share one ``p x p`` tensor.

The solver's workspace is a single ``(p, p)`` buffer ``P`` (the Gram matrix's own storage when
``solve_layer(..., in_place=True)``):

* the **strict upper triangle** of ``P`` holds ``H`` and is never written by anything in this module;
* the **lower triangle with the diagonal** holds a second symmetric matrix, the working one (the swept
  system of :mod:`.sweep`, later the Cholesky factor of the refit), read as ``A[i, j] = P[max(i, j),
  min(i, j)]``;
* ``diag(H)`` is saved in a separate length-p vector, so :func:`mirror_upper_` restores ``H`` bit for bit
  at any time (damping retries, the end of the solve, or an error).

Every kernel here works on views with any row stride (sub-blocks of ``P``), touches only its own triangle,
and needs at most ``O(panel * n)`` temporary memory; the flop-heavy parts are ``addmm_`` on rectangular
panels (BLAS on strided views, no copies) plus small masked updates of the diagonal blocks. Each update of
the lower triangle costs half the memory traffic and flops of the same update on the full square, which
is also what makes the memory-bound rank-t pivots of stage A faster.
"""

from __future__ import annotations

import torch

__all__ = [
    "DEFAULT_BLOCK",
    "cholesky_lower_",
    "cholesky_solve_lower_",
    "empty_square",
    "fill_principal_lower_",
    "inner",
    "invert_cholesky_lower_",
    "lower_diagonal_blocks",
    "lower_update_",
    "lower_update_scratch",
    "mirror_upper_",
    "padded_row_stride",
    "panel_width",
    "quadratic_form",
    "row_slices",
    "symmetric_rows",
    "write_symmetric_rows_",
]

DEFAULT_BLOCK = 256
SMALL_BLOCK = 128
PANELS = 16


def padded_row_stride(n: int, dtype: torch.dtype) -> int:
    """A row stride >= n for an ``n x n`` matrix whose rows start an odd number of 64-byte cache lines apart.

    A row stride that is a multiple of 4 KiB (p = 10240 float32 values: 40 KiB) maps the same column of
    consecutive rows to the same cache sets, which made the memory-bound rank-t updates of stage A about
    1.5x slower on the reference machine; one extra cache line per row avoids it.
    """
    unit = max(1, 64 // torch.empty(0, dtype=dtype).element_size())
    stride = max(n, unit)
    stride += (unit - stride % (2 * unit)) % (2 * unit)
    return stride


def empty_square(n: int, dtype: torch.dtype, device: torch.device | str, row_stride: int | None = None) -> torch.Tensor:
    """An uninitialised ``(n, n)`` row-major matrix with row stride ``row_stride`` (default
    :func:`padded_row_stride`): a view of the first ``n`` columns of an ``(n, row_stride)`` tensor."""
    stride = padded_row_stride(n, dtype) if row_stride is None else row_stride
    return torch.empty(n, stride, dtype=dtype, device=device)[:, :n]


def is_row_major(H: torch.Tensor) -> bool:
    """Whether the square matrix ``H`` is stored row by row (unit column stride, rows at least ``n`` apart)."""
    return H.stride(1) == 1 and H.stride(0) >= H.shape[0]


def square_copy(H: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy of the square matrix ``H`` in ``dtype``, with H's row stride when H is row-major (so that work in
    the copy runs exactly as it would in H's own storage), else :func:`padded_row_stride`."""
    out = empty_square(H.shape[0], dtype, H.device, H.stride(0) if is_row_major(H) else None)
    out.copy_(H)
    return out


def panel_width(n: int) -> int:
    """Columns per panel of a triangular kernel: about n / PANELS, at least ``SMALL_BLOCK`` (few Python steps,
    wide ``addmm_`` panels)."""
    return max(SMALL_BLOCK, -(-n // PANELS))


def _lower_mask(size: int, device: torch.device, strict: bool = False) -> torch.Tensor:
    rows = torch.arange(size, device=device)
    return rows[:, None] > rows[None, :] if strict else rows[:, None] >= rows[None, :]


def _diagonal_batch(n: int) -> tuple[int, int]:
    """(panel width, diagonal blocks per batch) of :func:`lower_update_` for an ``n x n`` matrix."""
    width = panel_width(n)
    return width, max(1, min(n // width, (1 << 22) // (width * width)))  # at most 4M values at once


def lower_update_scratch(n: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A scratch buffer for repeated :func:`lower_update_` calls on ``n x n`` matrices (``scratch=``)."""
    width, per_batch = _diagonal_batch(n)
    return torch.empty(per_batch * width * width, dtype=dtype, device=device)


def lower_update_(
    A: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float = -1.0, scratch: torch.Tensor | None = None
) -> None:
    """``A[x, y] += alpha * sum_k left[k, x] right[k, y]`` for ``x >= y``, in place; the strict upper
    triangle of ``A`` is not written.

    ``A`` is a square view (column stride 1, any row stride); ``left`` and ``right`` are ``(t, n)``. The
    update is a rank-t product restricted to the lower triangle: for a symmetric ``left^T right`` (as in every
    caller) the lower triangle of the result is that of the full update. Column panels: one ``addmm_`` for
    the rectangle below each diagonal block, and all diagonal blocks at once, by a batched product and a
    mask (a few dozen operations in all, whatever n: each costs a thread wake-up under a passive OpenMP
    wait policy). ``scratch`` (from :func:`lower_update_scratch`) holds the diagonal blocks' update: callers
    that update the same matrix many times pass one, so that no block-sized temporary is allocated and freed
    at every call (which fragmented glibc's heap: the resident memory grew by megabytes per call).
    """
    n = A.shape[0]
    t = left.shape[0]
    if n == 0 or t == 0:
        return
    width, per_batch = _diagonal_batch(n)
    for j0 in range(0, n, width):
        j1 = min(n, j0 + width)
        if j1 < n:
            A[j1:, j0:j1].addmm_(left[:, j1:].T, right[:, j0:j1], alpha=alpha)
    full = n // width
    mask = _lower_mask(width, A.device)
    if scratch is None or scratch.numel() < per_batch * width * width:
        scratch = torch.empty(per_batch * width * width, dtype=A.dtype, device=A.device)
    stride = A.stride(0)
    for b0 in range(0, full, per_batch):
        b = min(full, b0 + per_batch) - b0
        blocks = A.as_strided((b, width, width), (width * stride + width, stride, 1),
                              A.storage_offset() + b0 * (width * stride + width))
        columns = slice(b0 * width, (b0 + b) * width)
        lefts = left[:, columns].reshape(t, b, width).permute(1, 2, 0)  # (b, w, t)
        rights = right[:, columns].reshape(t, b, width).transpose(0, 1)  # (b, t, w)
        update = scratch[: b * width * width].view(b, width, width)
        torch.baddbmm(blocks, lefts, rights, alpha=alpha, out=update)
        torch.where(mask, update, blocks, out=update)
        blocks.copy_(update)
    if full * width < n:
        j0 = full * width
        w = n - j0
        block = A[j0:, j0:]
        update = scratch[: w * w].view(w, w)
        torch.addmm(block, left[:, j0:].T, right[:, j0:], alpha=alpha, out=update)
        torch.where(mask[:w, :w], update, block, out=update)
        block.copy_(update)


def _lower_coordinates(channels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where entry ``(c, j)`` of the symmetric matrix lives in the lower triangle, for c in ``channels`` and
    every j: ``(max(c, j), min(c, j))``, as two ``(t, n)`` index tensors."""
    index = torch.arange(n, device=channels.device)[None, :]
    c = channels[:, None]
    return torch.maximum(c, index), torch.minimum(c, index)


def symmetric_rows(A: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Rows ``channels`` of the symmetric matrix whose lower triangle is stored in ``A``: ``(t, n)``."""
    rows, columns = _lower_coordinates(channels, A.shape[0])
    return A[rows, columns]


def write_symmetric_rows_(A: torch.Tensor, channels: torch.Tensor, rows: torch.Tensor) -> None:
    """Set rows and columns ``channels`` of the symmetric matrix stored in ``A``'s lower triangle to ``rows``
    (``(t, n)``). ``rows[:, channels]`` must be exactly symmetric: its entries are written twice. The strict
    upper triangle is not written."""
    A.index_put_(_lower_coordinates(channels, A.shape[0]), rows)


def lower_diagonal_blocks(A: torch.Tensor, group_size: int) -> torch.Tensor:
    """The ``(m, g, g)`` diagonal group blocks of the symmetric matrix stored in ``A``'s lower triangle.

    A zero-copy view for ``g = 1`` (the diagonal); otherwise symmetrised copies (``m g^2 = p g`` values).
    """
    n = A.shape[0]
    g = group_size
    stride = A.stride(0)
    blocks = A.as_strided((n // g, g, g), (g * stride + g, stride, 1), A.storage_offset())
    if g == 1:
        return blocks
    lower = blocks.tril()
    return lower + lower.tril(-1).transpose(1, 2)


def mirror_upper_(A: torch.Tensor, diagonal: torch.Tensor) -> None:
    """Make ``A`` the full symmetric matrix of its strict upper triangle and ``diagonal`` (restores H)."""
    n = A.shape[0]
    width = panel_width(n)
    strict = _lower_mask(min(width, n), A.device, strict=True)
    for r0 in range(0, n, width):
        r1 = min(n, r0 + width)
        if r0 > 0:
            A[r0:r1, :r0].copy_(A[:r0, r0:r1].T)
        block = A[r0:r1, r0:r1]
        w = r1 - r0
        block.copy_(torch.where(strict[:w, :w], block.T, block))
    A.diagonal().copy_(diagonal)


def fill_principal_lower_(
    P: torch.Tensor, channels: torch.Tensor, diagonal: torch.Tensor, shift: float
) -> torch.Tensor:
    """Write ``H[S, S] + shift * I`` (S = ``channels``, sorted ascending, no repeats) into the lower triangle
    of the leading ``s x s`` block of ``P``, reading ``H`` from ``P``'s strict upper triangle and
    ``diagonal``; return that ``(s, s)`` view.

    Reads ``P[S_b, S_a]`` with ``S_b < S_a`` (strict upper) and writes ``P[a, b]`` with ``a >= b``
    (lower), so no value is overwritten before it is read.
    """
    s = channels.numel()
    width = panel_width(s)
    strict = _lower_mask(min(width, max(s, 1)), P.device, strict=True)
    for a0 in range(0, s, width):
        a1 = min(s, a0 + width)
        # values[a - a0, b] = P[S_b, S_a] = H[S_a, S_b] for b < a (b < a1); gathered without a copy of P
        values = P[channels[None, :a1], channels[a0:a1, None]]
        if a0 > 0:
            P[a0:a1, :a0].copy_(values[:, :a0])
        block = P[a0:a1, a0:a1]
        w = a1 - a0
        block.copy_(torch.where(strict[:w, :w], values[:, a0:a1], block))
    principal = P[:s, :s]
    principal.diagonal().copy_(diagonal.index_select(0, channels)).add_(shift)
    return principal


def cholesky_lower_(A: torch.Tensor, block: int = DEFAULT_BLOCK) -> int:
    """Blocked right-looking Cholesky in place: the lower triangle of ``A`` (symmetric, stored there) becomes
    ``L`` with ``L L^T = A``; the strict upper triangle is not written.

    Returns 0 on success, otherwise the order of the first leading minor that is not positive definite
    (as LAPACK's ``info``); ``A`` is then partly overwritten.
    """
    n = A.shape[0]
    mask = _lower_mask(min(block, max(n, 1)), A.device)
    for k0 in range(0, n, block):
        k1 = min(n, k0 + block)
        w = k1 - k0
        diagonal_block = A[k0:k1, k0:k1]
        lower = diagonal_block.tril()
        factor, info = torch.linalg.cholesky_ex(lower + lower.tril(-1).T)
        if int(info) != 0:
            return k0 + int(info)
        diagonal_block.copy_(torch.where(mask[:w, :w], factor, diagonal_block))
        if k1 < n:
            panel = A[k1:, k0:k1]
            panel.copy_(torch.linalg.solve_triangular(factor.T, panel, upper=True, left=False))
            lower_update_(A[k1:, k1:], panel.T, panel.T, alpha=-1.0)
    return 0


def _lower_matmul(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``tril(A) @ X`` for a square view ``A`` whose lower triangle is the operand (a new ``(n, k)`` tensor)."""
    n = A.shape[0]
    out = torch.empty(n, X.shape[1], dtype=X.dtype, device=X.device)
    width = panel_width(n)
    for r0 in range(0, n, width):
        r1 = min(n, r0 + width)
        torch.mm(A[r0:r1, r0:r1].tril(), X[r0:r1], out=out[r0:r1])
        if r0 > 0:
            out[r0:r1].addmm_(A[r0:r1, :r0], X[:r0])
    return out


def invert_cholesky_lower_(A: torch.Tensor, block: int = DEFAULT_BLOCK) -> None:
    """Turn the Cholesky factor L in ``A``'s lower triangle into the lower triangle of ``-(L L^T)^{-1}``,
    in place (LAPACK's ``trtri`` then ``lauum``, blocked; n^3 / 3 flops each). The strict upper triangle is
    not written."""
    n = A.shape[0]
    mask = _lower_mask(min(block, max(n, 1)), A.device)
    starts = list(range(0, n, block))
    # 1. M = L^{-1}: [[L11, 0], [L21, L22]]^{-1} = [[L11^{-1}, 0], [-L22^{-1} L21 L11^{-1}, L22^{-1}]],
    #    diagonal blocks from the last, so that L22^{-1} is already in place.
    for j0 in reversed(starts):
        j1 = min(n, j0 + block)
        w = j1 - j0
        diagonal_block = A[j0:j1, j0:j1]
        eye = torch.eye(w, dtype=A.dtype, device=A.device)
        inverse = torch.linalg.solve_triangular(diagonal_block.tril(), eye, upper=False)
        if j1 < n:
            panel = A[j1:, j0:j1]
            panel.copy_(torch.mm(_lower_matmul(A[j1:, j1:], panel), inverse).neg_())
        diagonal_block.copy_(torch.where(mask[:w, :w], inverse, diagonal_block))
    # 2. -(M^T M), block row by block row: [M^T M]_IJ = M_II^T M_IJ + sum_{K > I} M_KI^T M_KJ (J <= I) reads
    #    only block rows >= I, which are still M.
    for i0 in starts:
        i1 = min(n, i0 + block)
        w = i1 - i0
        diagonal_block = A[i0:i1, i0:i1]
        factor = diagonal_block.tril()
        new_block = torch.mm(factor.T, factor)
        below = A[i1:, i0:i1]
        if i1 < n:
            new_block.addmm_(below.T, below)
        if i0 > 0:
            row = A[i0:i1, :i0]
            row.copy_(torch.mm(factor.T, row))
            if i1 < n:
                row.addmm_(below.T, A[i1:, :i0])
            row.neg_()
        diagonal_block.copy_(torch.where(mask[:w, :w], new_block.neg_(), diagonal_block))


def cholesky_solve_lower_(L: torch.Tensor, rhs: torch.Tensor, block: int = DEFAULT_BLOCK) -> float:
    """Solve ``L L^T X = rhs`` in place (``rhs`` becomes ``X``) with the factor in ``L``'s lower triangle.

    Returns ``||L^{-1} rhs||^2 = tr(rhs^T (L L^T)^{-1} rhs)`` (computed between the two triangular solves).
    """
    n = L.shape[0]
    starts = list(range(0, n, block))
    for k0 in starts:  # forward: L Y = rhs
        k1 = min(n, k0 + block)
        if k0 > 0:
            rhs[k0:k1].addmm_(L[k0:k1, :k0], rhs[:k0], alpha=-1.0)
        rhs[k0:k1] = torch.linalg.solve_triangular(L[k0:k1, k0:k1].tril(), rhs[k0:k1], upper=False)
    squared_norm = inner(rhs, rhs)
    for k0 in reversed(starts):  # backward: L^T X = Y
        k1 = min(n, k0 + block)
        if k1 < n:
            rhs[k0:k1].addmm_(L[k1:, k0:k1].T, rhs[k1:], alpha=-1.0)
        rhs[k0:k1] = torch.linalg.solve_triangular(L[k0:k1, k0:k1].tril().T, rhs[k0:k1], upper=True)
    return squared_norm


def row_slices(X: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``X`` split along its first dimension into slices of at most 1/8 of it and about 4M values (for
    element-wise work without an X-sized temporary)."""
    if X.dim() < 2 or X.shape[0] == 0:
        return (X,)
    rows = max(1, min((1 << 22) // max(1, X[0].numel()), -(-X.shape[0] // 8)))
    return X.split(rows)


def inner(X: torch.Tensor, Y: torch.Tensor) -> float:
    """``sum(X * Y)`` for two tensors of the same shape, one :func:`row_slices` slice at a time, accumulated
    in a Python float."""
    return float(sum(float((x * y).sum()) for x, y in zip(row_slices(X), row_slices(Y))))


def quadratic_form(H: torch.Tensor, X: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    """``tr(X_R^T H_RR X_R)`` for a full symmetric ``H`` (``R`` = ``rows``, all rows if None), computed in
    row panels so that no ``|R| x |R|`` or ``|R| x q`` temporary is needed beyond one panel."""
    if rows is None:
        n = H.shape[0]
        width = panel_width(n)
        return float(sum(inner(X[r0:r0 + width], H[r0:r0 + width] @ X) for r0 in range(0, n, width)))
    n = rows.numel()
    width = panel_width(n)
    X_R = X.index_select(0, rows)
    total = 0.0
    for r0 in range(0, n, width):
        panel = rows[r0:r0 + width]
        total += inner(X_R[r0:r0 + width], H[panel[:, None], rows[None, :]] @ X_R)
    return total
