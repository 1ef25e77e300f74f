"""``solve_layer``: stage A, optional stage B and the final ridge refit for one consumer layer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from osscar_hf.solver.elimination import eliminate, initial_system
from osscar_hf.solver.local_search import local_search
from osscar_hf.solver.problem import (
    absolute_damping,
    check_finite,
    check_gram_diagonal,
    damped_cholesky,
    damped_targets,
    objective,
    refit,
    relative_error,
    validate_arguments,
)
from osscar_hf.solver.sweep import channels_of

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
    seconds_stage_a: float  # damping, factorisation, inverse and elimination
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
) -> LayerSolution:
    """Keep ``num_keep`` of the ``m = p / group_size`` input groups of a linear layer and refit its weights.

    Args:
        H: ``(p, p)`` Gram matrix of the layer's inputs (running mean ``X^T X / N``, float32).
        W_hat: ``(p, q)`` dense weight, input-major (``linear.weight.T``).
        group_size: channels per group (1 for neurons, ``head_dim`` or ``n_rep * head_dim`` for heads).
        num_keep: groups to keep, in ``[0, m]``.
        damping: ``lam = damping * mean(diag H)`` (absolute ``damping`` if that mean is 0).
        step: about how many groups stage A removes per step (1 = exact greedy).
        local_search_iters: maximum stage-B rounds (0 disables stage B).
        swap_size: groups dropped and re-added per stage-B round.
        dtype: dtype of all solver arithmetic (on H's device).
        cross_gram: optional ``X_pruned^T X_dense / N`` for dense targets: ``Gb = (cross_gram + lam I) W_hat``.
        halve_on_failure: when a stage-B round does not improve, halve the swap size and retry instead of
            stopping.

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
    if num_keep == m:
        return _keep_everything(m, H, W_hat, damping, dtype, cross_gram, started)

    device = H.device
    p = H.shape[0]
    W0 = W_hat.to(device=device, dtype=dtype, copy=True)
    W0[H.diagonal() == 0] = 0.0  # dead input channels

    damped = damped_cholesky(H, damping, dtype)
    lam = damped.lam
    Gb = None if cross_gram is None else damped_targets(cross_gram, W0, lam)
    W_dense = W0 if Gb is None else torch.cholesky_solve(Gb, damped.factor)
    B = initial_system(torch.cholesky_inverse(damped.factor), W_dense)
    del damped
    stage_a = eliminate(B, group_size=group_size, num_keep=num_keep, step=step, objective_start=0.0)
    _synchronize(device)
    after_stage_a = time.perf_counter()

    if Gb is None:
        Gb = damped_targets(H, W0, lam)
    objective_dense = float(-0.5 * (Gb * W_dense).sum())
    objective_stage_a = objective_dense + float(stage_a.objective_curve[-1])

    kept = stage_a.kept
    swaps = 0
    before_search = time.perf_counter()
    if local_search_iters > 0:
        search = local_search(
            B,
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
    del B

    kept_groups = torch.nonzero(kept).flatten()
    channels = channels_of(kept_groups, group_size)
    H_rows = H.index_select(0, channels).to(dtype)
    W_S, objective_final = refit(H_rows, channels, lam, Gb)
    if swaps == 0:
        objective_stage_a = objective_final  # same support: report one value, from the fresh refit
    H_W_hat = Gb - lam * W0 if cross_gram is None else H.to(dtype) @ W0
    error = relative_error(H, H_rows, channels, W_S, W0, H_W_hat)
    error_masked = relative_error(H, H_rows, channels, W0.index_select(0, channels), W0, H_W_hat)

    weight = torch.zeros(p, W_hat.shape[1], dtype=dtype, device=device)
    weight.index_copy_(0, channels, W_S)
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
    cross_gram: torch.Tensor | None,
    started: float,
) -> LayerSolution:
    """``num_keep == m``: nothing to solve; return ``W_hat`` unchanged and ``f(W_hat)`` as every objective."""
    device = H.device
    lam = absolute_damping(H, damping)
    W0 = W_hat.to(device=device, dtype=dtype)
    Gb = damped_targets(H if cross_gram is None else cross_gram, W0, lam)
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
