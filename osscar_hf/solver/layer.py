"""``solve_layer``: stage A, optional stage B and the final ridge refit for one consumer layer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from osscar_hf.solver.elimination import eliminate
from osscar_hf.solver.local_search import local_search
from osscar_hf.solver.packed import (
    inner,
    is_row_major,
    mirror_upper_,
    panel_width,
    quadratic_form,
    square_copy,
)
from osscar_hf.solver.problem import (
    absolute_damping,
    check_finite,
    check_gram_diagonal,
    damped_inverse_,
    damped_targets,
    objective,
    refit_in_place,
    relative_error,
    validate_arguments,
)
from osscar_hf.solver.sweep import SweptSystem, channels_of

__all__ = ["LayerSolution", "solve_layer"]

logger = logging.getLogger(__name__)


@dataclass
class LayerSolution:
    """The solution of one layer-wise problem (see :func:`solve_layer`)."""

    kept_groups: torch.Tensor  # int64, sorted ascending, indices of kept groups (0..m-1)
    weight: torch.Tensor  # (p, q) input-major refit weight; rows of pruned groups exactly 0; W_hat's dtype/device
    objective_dense: float  # f at the unconstrained optimum (all groups kept)
    objective_stage_a: float  # f after stage A
    objective: float  # f after stage B (== objective_stage_a when stage B is off or accepted no swap)
    relative_error: float  # tr(D^T H D) / tr(W_hat^T H W_hat) with the undamped H; 0 if the denominator is 0
    removal_order: torch.Tensor  # int64, groups in the order stage A removed them
    swaps_accepted: int
    damping_used: float  # the absolute lam finally used
    seconds_stage_a: float  # checks, Gb, damping, the swept system (inverse) and elimination
    seconds_local_search: float
    objective_curve: torch.Tensor | None = None  # float64 (n_steps + 1,): f before and after each stage-A step
    curve_num_kept: torch.Tensor | None = None  # int64 (n_steps + 1,): kept groups at each curve point
    seconds_total: float = 0.0  # the whole call, refit and reconstruction error included
    relative_error_masked: float = 0.0  # the same error for the kept support without the refit (W_hat masked)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def solve_layer(
    H: torch.Tensor,
    W_hat: torch.Tensor,
    *,
    group_size: int,
    num_keep: int,
    damping: float = 0.01,
    step: int = 1,
    local_search_iters: int = 30,
    swap_size: int = 1,
    dtype: torch.dtype = torch.float64,
    cross_gram: torch.Tensor | None = None,
    halve_on_failure: bool = False,
    in_place: bool = False,
) -> LayerSolution:
    """Keep ``num_keep`` of the ``m = p / group_size`` input groups of a linear layer and refit its weights.

    Args:
        H: ``(p, p)`` Gram matrix of the layer's inputs (running mean ``X^T X / N``, float32). It is taken to
            be symmetric: only its upper triangle and diagonal are read.
        W_hat: ``(p, q)`` dense weight, input-major (``linear.weight.T``).
        group_size: channels per group (1 for neurons, ``head_dim`` or ``n_rep * head_dim`` for heads).
        num_keep: groups to keep, in ``[0, m]``.
        damping: ``lam = damping * mean(diag H)`` (absolute ``damping`` if that mean is 0).
        step: about how many groups stage A removes per step (1 = exact greedy).
        local_search_iters: maximum stage-B rounds (0 disables stage B).
        swap_size: groups dropped and re-added per stage-B round.
        dtype: dtype of all solver arithmetic (on H's device).
        cross_gram: optional ``C = X_pruned^T X_dense / N`` for dense targets: ``Gb = C W_hat + lam W0``, where
            ``W0`` is W_hat with the rows of dead channels (``diag H = 0``) zeroed, as everywhere: a channel dead
            in the pruned stream keeps its dense contribution to the targets. Even with every group kept the
            weight is then the refit ``Hb^{-1} Gb``, not W_hat.
        halve_on_failure: when a stage-B round does not improve, halve the swap size and retry instead of
            stopping.
        in_place: use H's own storage as the solver's ``p x p`` workspace instead of a copy of H, which
            saves ``p^2`` values of peak memory. Takes effect when H is row-major (``H.stride(1) == 1``, as
            from :func:`new_gram`, or contiguous) and already in ``dtype``; otherwise a working copy is
            made and H is not touched. H's lower triangle and diagonal are then overwritten during the call
            and restored before it returns or raises: afterwards H is the symmetric matrix of its upper
            triangle and diagonal (bit for bit the H passed in when that was exactly symmetric, which
            ``X^T X`` from a matrix product need not be, by rounding). The solution does not depend on
            ``in_place``. Do not read H from another thread during the call.

    Memory: besides H (or its copy), ``O(p q)``: about two ``(p, q)`` tensors in ``dtype`` (three with
    ``cross_gram``) plus ``O(p * max(256, p / 16))`` temporaries; no other ``p x p`` matrix is ever allocated.

    Raises:
        ValueError: an argument is out of range.
        SolverError: non-finite inputs, or a damped Gram matrix that stays singular.
    """
    started = time.perf_counter()
    m = validate_arguments(
        H,
        W_hat,
        group_size=group_size,
        num_keep=num_keep,
        damping=damping,
        step=step,
        local_search_iters=local_search_iters,
        swap_size=swap_size,
        dtype=dtype,
        cross_gram=cross_gram,
    )
    check_finite(H, "H (the Gram matrix)")
    check_gram_diagonal(H)
    check_finite(W_hat, "W_hat (the dense weight)")
    if cross_gram is not None:
        check_finite(cross_gram, "cross_gram (the dense-target cross Gram matrix)")
    if num_keep == m and cross_gram is None:
        return _keep_everything(m, H, W_hat, damping, dtype, started)

    borrowed = in_place and H.dtype == dtype and is_row_major(H)
    # A copy keeps H's layout when possible, so that in_place=True and False give identical results.
    packed = H if borrowed else square_copy(H, dtype)
    diagonal = packed.diagonal().clone()
    try:
        return _solve(packed, diagonal, H, W_hat, group_size, num_keep, damping, step, local_search_iters,
                      swap_size, cross_gram, halve_on_failure, started)
    except BaseException:
        if borrowed:
            mirror_upper_(packed, diagonal)  # give the caller its H back
        raise


def _dense_weight(W_hat: torch.Tensor, diagonal: torch.Tensor, *, zero_dead: bool = True) -> torch.Tensor:
    """``W_hat`` as a contiguous ``(p, q)`` tensor in the solver's dtype and device, dead channels (``diag H =
    0``) zeroed unless ``zero_dead`` is False."""
    W0 = torch.empty(W_hat.shape, dtype=diagonal.dtype, device=diagonal.device)
    W0.copy_(W_hat)
    if zero_dead:
        W0[diagonal == 0] = 0.0
    return W0


def _matmul_rows(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``A @ X`` in X's dtype, converting ``A`` one row panel at a time (no converted copy of A)."""
    out = torch.empty(A.shape[0], X.shape[1], dtype=X.dtype, device=X.device)
    width = panel_width(A.shape[0])
    for r0 in range(0, A.shape[0], width):
        out[r0:r0 + width] = A[r0:r0 + width].to(device=X.device, dtype=X.dtype) @ X
    return out


def _damped_targets(source_W0: torch.Tensor, W0: torch.Tensor) -> Callable[[float], torch.Tensor]:
    """``lam -> Gb = source @ W0 + lam W0`` (a new tensor), given ``source @ W0``."""
    return lambda lam: torch.add(source_W0, W0, alpha=lam)


def _solve(
    packed: torch.Tensor,
    diagonal: torch.Tensor,
    H: torch.Tensor,
    W_hat: torch.Tensor,
    group_size: int,
    num_keep: int,
    damping: float,
    step: int,
    local_search_iters: int,
    swap_size: int,
    cross_gram: torch.Tensor | None,
    halve_on_failure: bool,
    started: float,
) -> LayerSolution:
    """:func:`solve_layer` on the workspace ``packed`` (holding H; H again on return) with ``diag H``; ``H``
    is the caller's matrix (``packed`` itself when borrowed), read only before the workspace is modified.

    Memory, in ``(p, q)`` tensors next to ``packed``: ``W0`` and ``H W0`` (then Gb) until the swept system is
    built, the swept values and Gb during stages A and B, then ``Gb_S`` (solved in place into ``W_S``), the
    output weight and ``D = W - W0`` for the errors.
    """
    device = packed.device
    p = packed.shape[0]
    m = p // group_size
    W0 = _dense_weight(W_hat, diagonal, zero_dead=cross_gram is None)
    mirror_upper_(packed, diagonal)  # from here on, only H's upper triangle counts

    # Everything that needs all of H before its lower triangle becomes the swept system: Gb and the scalars.
    if cross_gram is None:
        HW0 = packed @ W0
        denominator = inner(W0, HW0)  # tr(W0^T H W0), for the relative errors
        lam, _ = damped_inverse_(packed, diagonal, H, damping)
        Gb = HW0.add_(W0, alpha=lam)
        del HW0
        system = SweptSystem(packed, W0)  # [-Hb^{-1} | W_dense]: the unconstrained optimum is W0 itself
        objective_dense = -0.5 * inner(Gb, W0)
    else:
        # A channel dead in the pruned stream may live in the dense one: its dense contribution C W_hat stays in
        # the targets; only the ridge anchor W0 has the dead rows zeroed.
        CW0 = _matmul_rows(cross_gram, W0)
        W0[diagonal == 0] = 0.0
        denominator = quadratic_form(packed, W0)
        lam, W_dense = damped_inverse_(packed, diagonal, H, damping, _damped_targets(CW0, W0))
        Gb = CW0.add_(W0, alpha=lam)
        del CW0
        system = SweptSystem(packed, W_dense)
        objective_dense = -0.5 * inner(Gb, W_dense)
        del W_dense
    del W0
    stage_a = eliminate(system, group_size=group_size, num_keep=num_keep, step=step, objective_start=0.0)
    _synchronize(device)
    after_stage_a = time.perf_counter()
    objective_stage_a = objective_dense + float(stage_a.objective_curve[-1])

    kept = stage_a.kept
    swaps = 0
    before_search = time.perf_counter()
    if local_search_iters > 0:
        search = local_search(
            system,
            kept,
            group_size=group_size,
            swap_size=swap_size,
            max_iters=local_search_iters,
            objective_start=objective_stage_a,
            halve_on_failure=halve_on_failure,
        )
        kept, swaps = search.kept, search.swaps_accepted
    _synchronize(device)
    seconds_local_search = time.perf_counter() - before_search
    del system

    # Fresh ridge refit on the final support, factored in the workspace's lower triangle.
    kept_groups = torch.nonzero(kept).flatten()
    channels = channels_of(kept_groups, group_size)
    W_S = Gb.index_select(0, channels)
    del Gb
    objective_final = refit_in_place(packed, channels, diagonal, lam, W_S)
    if swaps == 0:
        objective_stage_a = objective_final  # same support: report one value, from the fresh refit
    mirror_upper_(packed, diagonal)  # packed is H again (and the caller's H, restored, when borrowed)

    # Reconstruction errors with the undamped H, tr(D^T H D) / tr(W0^T H W0): the masked W0 has D = -W0 on
    # the pruned rows and 0 elsewhere; the refit W has D = W - W0.
    weight = torch.zeros(p, W_hat.shape[1], dtype=packed.dtype, device=device)
    weight.index_copy_(0, channels, W_S)
    del W_S
    W0 = _dense_weight(W_hat, diagonal)
    pruned_channels = channels_of(torch.nonzero(~kept).flatten(), group_size)
    error_masked = relative_error(quadratic_form(packed, W0, pruned_channels), denominator)
    D = W0.neg_().add_(weight)
    del W0
    error = relative_error(quadratic_form(packed, D), denominator)
    del D
    _synchronize(device)
    finished = time.perf_counter()
    logger.debug(
        "solve_layer: p=%d m=%d keep=%d step=%d | f dense %.6g, stage A %.6g, final %.6g | %d swaps | "
        "relative error %.4g | %.3fs",
        p,
        m,
        num_keep,
        step,
        objective_dense,
        objective_stage_a,
        objective_final,
        swaps,
        error,
        finished - started,
    )
    return LayerSolution(
        kept_groups=kept_groups.to(torch.int64),
        weight=weight.to(device=W_hat.device, dtype=W_hat.dtype),
        objective_dense=objective_dense,
        objective_stage_a=objective_stage_a,
        objective=objective_final,
        relative_error=error,
        removal_order=stage_a.removal_order,
        swaps_accepted=swaps,
        damping_used=lam,
        seconds_stage_a=after_stage_a - started,
        seconds_local_search=seconds_local_search,
        objective_curve=stage_a.objective_curve + objective_dense,
        curve_num_kept=stage_a.curve_num_kept,
        seconds_total=finished - started,
        relative_error_masked=error_masked,
    )


def _keep_everything(
    m: int,
    H: torch.Tensor,
    W_hat: torch.Tensor,
    damping: float,
    dtype: torch.dtype,
    started: float,
) -> LayerSolution:
    """``num_keep == m`` without dense targets: W_hat is the optimum (``Gb = Hb W_hat``), so return it unchanged
    and ``f(W_hat)`` as every objective. (With a cross Gram it is not: that case is a full refit.)"""
    device = H.device
    lam = absolute_damping(H, damping)
    W0 = W_hat.to(device=device, dtype=dtype)
    Gb = damped_targets(H, W0, lam)
    value = objective(W0, H, lam, Gb)
    elapsed = time.perf_counter() - started
    return LayerSolution(
        kept_groups=torch.arange(m, dtype=torch.int64, device=device),
        weight=W_hat.clone(),
        objective_dense=value,
        objective_stage_a=value,
        objective=value,
        relative_error=0.0,
        removal_order=torch.zeros(0, dtype=torch.int64, device=device),
        swaps_accepted=0,
        damping_used=lam,
        seconds_stage_a=0.0,
        seconds_local_search=0.0,
        objective_curve=torch.tensor([value], dtype=torch.float64),
        curve_num_kept=torch.tensor([m], dtype=torch.int64),
        seconds_total=elapsed,
    )
