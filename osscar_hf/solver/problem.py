"""The layer-wise problem of ALGORITHM.md section 2: validation, damping, objective and ridge refit.

    f(W) = 1/2 tr(W^T Hb W) - tr(Gb^T W),  Hb = H + lam I,  Gb = Hb W_hat  (or (X_p^T X_d + lam I) W_hat)

For a support S the optimum is the ridge refit ``W_S = Hb_SS^{-1} Gb_S`` with ``f(S) = -1/2 tr(Gb_S^T W_S)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from osscar_hf.errors import SolverError
from osscar_hf.solver.packed import (
    cholesky_lower_,
    cholesky_solve_lower_,
    fill_principal_lower_,
    invert_cholesky_lower_,
    mirror_upper_,
    row_slices,
)

__all__ = [
    "DampedFactor",
    "absolute_damping",
    "check_finite",
    "check_gram_diagonal",
    "damped_cholesky",
    "damped_inverse_",
    "damped_targets",
    "objective",
    "refit_in_place",
    "relative_error",
    "validate_arguments",
]

logger = logging.getLogger(__name__)

MAX_DAMPING_RETRIES = 3


def validate_arguments(
    H: torch.Tensor,
    W_hat: torch.Tensor,
    *,
    group_size: int,
    num_keep: int,
    damping: float,
    step: int,
    local_search_iters: int,
    swap_size: int,
    dtype: torch.dtype,
    cross_gram: torch.Tensor | None,
) -> int:
    """Check shapes and ranges (ValueError naming the value and the accepted range); return m."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square (p, p) Gram matrix, got shape {tuple(H.shape)}")
    p = H.shape[0]
    if W_hat.dim() != 2 or W_hat.shape[0] != p:
        raise ValueError(f"W_hat must have shape (p, q) = ({p}, q) (input-major: weight.T), got {tuple(W_hat.shape)}")
    if not H.is_floating_point() or not W_hat.is_floating_point():
        raise ValueError(f"H and W_hat must be floating point, got {H.dtype} and {W_hat.dtype}")
    if cross_gram is not None and tuple(cross_gram.shape) != (p, p):
        raise ValueError(f"cross_gram must have shape ({p}, {p}) like H, got {tuple(cross_gram.shape)}")
    if not isinstance(group_size, int) or group_size < 1 or p % group_size != 0:
        raise ValueError(f"group_size must be a positive divisor of p = {p}, got {group_size!r}")
    m = p // group_size
    if not isinstance(num_keep, int) or not 0 <= num_keep <= m:
        raise ValueError(f"num_keep must be an integer in [0, {m}] (m = p / group_size groups), got {num_keep!r}")
    if not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an integer >= 1 (groups removed per stage-A step), got {step!r}")
    if not isinstance(local_search_iters, int) or local_search_iters < 0:
        raise ValueError(f"local_search_iters must be an integer >= 0 (0 disables stage B), got {local_search_iters!r}")
    if not isinstance(swap_size, int) or swap_size < 1:
        raise ValueError(f"swap_size must be an integer >= 1, got {swap_size!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype (float64 or float32), got {dtype}")
    return m


def check_gram_diagonal(H: torch.Tensor) -> None:
    """A Gram matrix has a non-negative diagonal; anything else was not built from inputs."""
    if bool((H.diagonal() < 0).any()):
        bad = torch.nonzero(H.diagonal() < 0).flatten()[:5].tolist()
        raise SolverError(
            f"H has negative diagonal entries (channels {bad}...), so it is not a Gram matrix X^T X; "
            "build it with accumulate_gram from the layer's inputs"
        )


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise SolverError at once if ``tensor`` holds a NaN or an infinity (checked in slices along the first
    dimension, so that no tensor-sized temporary is needed)."""
    if not all(bool(torch.isfinite(chunk).all()) for chunk in row_slices(tensor)):
        raise SolverError(
            f"{name} contains NaN or infinite values; check the calibration data and the model's "
            "activations (fp16 overflow?) before pruning"
        )


def absolute_damping(H: torch.Tensor, damping: float) -> float:
    """``lam = damping * mean(diag H)``, or ``damping`` itself when that mean is 0 (an all-zero H)."""
    diag_mean = float(H.diagonal().mean()) if H.shape[0] else 0.0
    return damping * diag_mean if diag_mean > 0 else float(damping)


@dataclass
class DampedFactor:
    """Cholesky factor of ``Hb = H + lam I`` with the damping ``lam`` actually used (:func:`damped_cholesky`)."""

    factor: torch.Tensor
    lam: float


def damped_cholesky(H: torch.Tensor, damping: float, dtype: torch.dtype) -> DampedFactor:
    """Factor ``H + lam I`` in ``dtype`` with ``lam = damping * mean(diag H)`` (``damping`` if that mean is 0).

    On failure ``lam`` is multiplied by 10, up to 3 times, with a warning each time; then SolverError. An
    out-of-place factorisation (a copy of H and a separate factor: ``2 p^2`` values), not used by
    ``solve_layer`` any more (see :func:`damped_inverse_`); kept for callers that time or check it.
    """
    lam = absolute_damping(H, damping)
    Hb = H.to(dtype=dtype, copy=True)
    Hb.diagonal().add_(lam)
    for attempt in range(MAX_DAMPING_RETRIES + 1):
        factor, info = torch.linalg.cholesky_ex(Hb)
        if int(info) == 0:
            return DampedFactor(factor, lam)
        if attempt == MAX_DAMPING_RETRIES:
            break
        # From no damping at all, start the retries at a small multiple of the matrix's scale.
        new_lam = lam * 10.0 if lam > 0 else 1e-8 * max(float(H.diagonal().abs().mean()), 1.0)
        logger.warning(
            "Cholesky of the damped Gram matrix failed (p = %d, lam = %.3g, leading minor %d not positive); "
            "retrying with lam = %.3g",
            H.shape[0],
            lam,
            int(info),
            new_lam,
        )
        Hb.diagonal().add_(new_lam - lam)
        lam = new_lam
    raise SolverError(
        f"the damped Gram matrix H + lam*I (p = {H.shape[0]}) is not positive definite even with "
        f"lam = {lam:.3g} after {MAX_DAMPING_RETRIES} retries with 10x more damping; raise `damping` "
        f"(now {damping:g}, relative to mean(diag H)) or check the calibration data "
        "(too few tokens, constant or duplicated input channels)"
    )


def damped_inverse_(
    packed: torch.Tensor,
    diagonal: torch.Tensor,
    H: torch.Tensor,
    damping: float,
    right_hand_side: Callable[[float], torch.Tensor] | None = None,
) -> tuple[float, torch.Tensor | None]:
    """Replace H in ``packed``'s lower triangle by ``-Hb^{-1}`` (``Hb = H + lam I``), in place; return
    ``(lam, Hb^{-1} right_hand_side(lam))`` (None without a right-hand side).

    ``packed`` holds H (symmetric, both triangles) and ``diagonal`` is ``diag H`` in ``packed``'s dtype;
    ``H`` is the caller's Gram matrix, read for its diagonal only (``packed`` itself when solving in
    place), so that ``lam = damping * mean(diag H)`` (``damping`` if that mean is 0) is computed as from
    the matrix passed in. Cholesky factorisation, solve, triangular inverse and ``L^{-T} L^{-1}``, all in
    the lower triangle. When the Cholesky factorisation fails, H is restored from ``packed``'s untouched
    upper triangle and ``lam`` is multiplied by 10, up to 3 times, with a warning each time; then
    SolverError (``packed`` then holds H again).
    """
    lam = absolute_damping(H, damping)
    scale = max(float(H.diagonal().abs().mean()), 1.0) if H.shape[0] else 1.0
    p = packed.shape[0]
    for attempt in range(MAX_DAMPING_RETRIES + 1):
        packed.diagonal().add_(lam)
        info = cholesky_lower_(packed)
        if info == 0:
            solution = None
            if right_hand_side is not None:
                solution = right_hand_side(lam)
                cholesky_solve_lower_(packed, solution)
            invert_cholesky_lower_(packed)
            return lam, solution
        mirror_upper_(packed, diagonal)
        if attempt == MAX_DAMPING_RETRIES:
            break
        # From no damping at all, start the retries at a small multiple of the matrix's scale.
        new_lam = lam * 10.0 if lam > 0 else 1e-8 * scale
        logger.warning(
            "Cholesky of the damped Gram matrix failed (p = %d, lam = %.3g, leading minor %d not positive); "
            "retrying with lam = %.3g",
            p,
            lam,
            info,
            new_lam,
        )
        lam = new_lam
    raise SolverError(
        f"the damped Gram matrix H + lam*I (p = {p}) is not positive definite even with "
        f"lam = {lam:.3g} after {MAX_DAMPING_RETRIES} retries with 10x more damping; raise `damping` "
        f"(now {damping:g}, relative to mean(diag H)) or check the calibration data "
        "(too few tokens, constant or duplicated input channels)"
    )


def damped_targets(source: torch.Tensor, W_hat: torch.Tensor, lam: float) -> torch.Tensor:
    """``Gb = (source + lam I) W_hat`` in W_hat's dtype; ``source`` is H, or the cross Gram for dense targets."""
    Gb = source.to(device=W_hat.device, dtype=W_hat.dtype) @ W_hat
    return Gb.add_(W_hat, alpha=lam)


def objective(W: torch.Tensor, H: torch.Tensor, lam: float, Gb: torch.Tensor) -> float:
    """``f(W) = 1/2 tr(W^T Hb W) - tr(Gb^T W)``, computed directly (reference and tests)."""
    HbW = H.to(W.dtype) @ W + lam * W
    return float(0.5 * (W * HbW).sum() - (Gb * W).sum())


def refit_in_place(
    packed: torch.Tensor, channels: torch.Tensor, diagonal: torch.Tensor, lam: float, targets: torch.Tensor
) -> float:
    """Ridge refit on the support ``channels``: ``targets`` (``Gb_S``, ``(|S|, q)``) becomes ``W_S =
    Hb_SS^{-1} Gb_S`` in place; returns ``f(S) = -1/2 tr(Gb_S^T W_S)``.

    ``Hb_SS`` is gathered from H in ``packed``'s strict upper triangle (and ``diagonal = diag H``) into the
    lower triangle of ``packed``'s leading ``|S| x |S|`` block and factored there: no ``|S| x |S|`` copy.
    """
    if channels.numel() == 0:
        return 0.0
    principal = fill_principal_lower_(packed, channels, diagonal, lam)
    if cholesky_lower_(principal) != 0:
        raise SolverError(
            f"the damped Gram matrix restricted to the {channels.numel()} kept channels is not positive "
            "definite; raise `damping` or solve in float64"
        )
    return -0.5 * cholesky_solve_lower_(principal, targets)


def relative_error(numerator: float, denominator: float) -> float:
    """``||X(W - W_hat)||^2 / ||X W_hat||^2`` from ``tr(D^T H D)`` and ``tr(W_hat^T H W_hat)`` (H undamped);
    0 when the denominator is not positive, and never negative (rounding)."""
    if denominator <= 0.0:
        return 0.0
    return max(numerator, 0.0) / denominator
