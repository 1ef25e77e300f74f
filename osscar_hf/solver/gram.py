"""Gram matrices of a consumer layer's inputs, accumulated as running means in float32.

``H = X^T X / N`` over all calibration tokens is built one batch at a time with a single ``addmm_`` per
batch (2 n p^2 flops, at matmul speed). Keeping a running *mean* rather than a sum keeps the entries of
order one however many tokens are seen, which is what float32 accumulation needs.
"""

from __future__ import annotations

import torch

from osscar_hf.solver.packed import empty_square

__all__ = ["accumulate_cross_gram", "accumulate_gram", "new_gram"]


def new_gram(p: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Return an empty (all-zero) ``(p, p)`` float32 Gram matrix on ``device``.

    The matrix is row-major with a slightly padded row stride (:func:`~osscar_hf.solver.packed.
    padded_row_stride`: a view of the first p columns of a ``(p, p + pad)`` tensor, pad <= 32), so it is not
    ``contiguous()``: ``solve_layer(..., in_place=True)`` then works in this storage at full speed.
    """
    if p < 1:
        raise ValueError(f"p must be a positive number of input channels, got {p}")
    return empty_square(p, torch.float32, device).zero_()


def _flatten_rows(X: torch.Tensor, width: int, name: str, target: torch.Tensor) -> torch.Tensor:
    if X.dim() < 1 or X.shape[-1] != width:
        raise ValueError(f"{name} must have shape (..., {width}), got {tuple(X.shape)}")
    return X.reshape(-1, width).to(device=target.device, dtype=target.dtype)


def _check_count(count: int) -> None:
    if count < 0:
        raise ValueError(f"count must be >= 0 (tokens already accumulated), got {count}")


def accumulate_gram(H: torch.Tensor, count: int, X: torch.Tensor) -> int:
    """Fold the rows of ``X`` into the running mean ``H`` in place and return the new token count.

    ``X`` has shape ``(..., p)`` and any float dtype; it is flattened to ``(n, p)`` and cast to ``H``'s
    dtype. After the call ``H = (count * H_old + X^T X) / (count + n)``, computed with one ``addmm_``.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square (p, p) matrix, got shape {tuple(H.shape)}")
    _check_count(count)
    rows = _flatten_rows(X, H.shape[0], "X", H)
    return _accumulate(H, count, rows, rows)


def accumulate_cross_gram(G: torch.Tensor, count: int, X_a: torch.Tensor, X_b: torch.Tensor) -> int:
    """Like :func:`accumulate_gram` for the cross Gram ``G = X_a^T X_b / N`` ("dense targets").

    ``X_a`` (the pruned model's inputs, ``(..., p_a)``) and ``X_b`` (the dense model's, ``(..., p_b)``)
    must hold the same number of tokens; ``G`` has shape ``(p_a, p_b)``.
    """
    if G.dim() != 2:
        raise ValueError(f"G must be a (p_a, p_b) matrix, got shape {tuple(G.shape)}")
    _check_count(count)
    rows_a = _flatten_rows(X_a, G.shape[0], "X_a", G)
    rows_b = _flatten_rows(X_b, G.shape[1], "X_b", G)
    if rows_a.shape[0] != rows_b.shape[0]:
        raise ValueError(
            f"X_a and X_b must hold the same number of tokens, got {rows_a.shape[0]} and {rows_b.shape[0]}"
        )
    return _accumulate(G, count, rows_a, rows_b)


def _accumulate(G: torch.Tensor, count: int, rows_a: torch.Tensor, rows_b: torch.Tensor) -> int:
    n = rows_a.shape[0]
    if n == 0:
        return count
    total = count + n
    G.addmm_(rows_a.T, rows_b, beta=count / total, alpha=1.0 / total)
    return total
