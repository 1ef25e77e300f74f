"""``solve_layer``: stage A, optional stage B and the final ridge refit for one consumer layer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from osscar_hf.solver.elimination import EliminationResult, eliminate
from osscar_hf.solver.local_search import local_search
from osscar_hf.solver.partitions import check_partitions
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


@dataclass(frozen=True)
class _Options:
    """What :func:`solve_layer` was asked for, besides the tensors it works on and their dtype."""

    group_size: int
    num_keep: int
    damping: float
    step: int
    local_search_iters: int
    swap_size: int
    cross_gram: torch.Tensor | None
    halve_on_failure: bool
    partitions: int = 1


@dataclass(frozen=True)
class _DenseStart:
    """The scalars fixed before the workspace becomes the swept system (:func:`_swept_start`)."""

    lam: float  # the absolute damping finally used
    objective_dense: float  # f at the unconstrained optimum
    denominator: float  # tr(W0^T H W0) with the undamped H, for the relative errors


@dataclass(frozen=True)
class _Selection:
    """The support chosen by stages A and B (:func:`_select_support`)."""

    kept: torch.Tensor  # (m,) bool
    stage_a: EliminationResult
    objective_stage_a: float  # f after stage A, from stage A's pivot deltas
    swaps_accepted: int
    stage_a_finished: float  # time.perf_counter() when stage A was done
    seconds_local_search: float


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
    partitions: int = 1,
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
        partitions: the groups split into this many equal, contiguous partitions (group ``j`` in partition
            ``j // (m / partitions)``), and every partition keeps ``num_keep / partitions`` of its groups (query heads
            inside KV groups: see :mod:`osscar_hf.solver.partitions`). Stage A never removes a group from a
            partition down to its share, and a stage-B swap stays inside partitions. 1: no constraint.

    Memory: besides H (or its copy), ``O(p q)``: about two ``(p, q)`` tensors in ``dtype`` (three with
    ``cross_gram``) plus ``O(p * max(256, p / 16))`` temporaries; no other ``p x p`` matrix is ever allocated.

    Raises:
        ValueError: an argument is out of range.
        SolverError: non-finite inputs, or a damped Gram matrix that stays singular.
    """
    started = time.perf_counter()
    options = _Options(group_size=group_size, num_keep=num_keep, damping=damping, step=step,
                       local_search_iters=local_search_iters, swap_size=swap_size, cross_gram=cross_gram,
                       halve_on_failure=halve_on_failure, partitions=partitions)
    m = _check_inputs(H, W_hat, options, dtype=dtype)
    if num_keep == m and cross_gram is None:
        return _keep_everything(H, W_hat, num_groups=m, damping=damping, dtype=dtype, started=started)
    return _solve_in_workspace(H, W_hat, options, dtype=dtype, in_place=in_place, started=started)


def _check_inputs(H: torch.Tensor, W_hat: torch.Tensor, options: _Options, *, dtype: torch.dtype) -> int:
    """Arguments in range (ValueError) and tensors finite, H with a Gram matrix's diagonal (SolverError);
    return the number of groups m."""
    m = validate_arguments(
        H,
        W_hat,
        group_size=options.group_size,
        num_keep=options.num_keep,
        damping=options.damping,
        step=options.step,
        local_search_iters=options.local_search_iters,
        swap_size=options.swap_size,
        dtype=dtype,
        cross_gram=options.cross_gram,
    )
    check_partitions(m, options.num_keep, options.partitions)
    check_finite(H, "H (the Gram matrix)")
    check_gram_diagonal(H)
    check_finite(W_hat, "W_hat (the dense weight)")
    if options.cross_gram is not None:
        check_finite(options.cross_gram, "cross_gram (the dense-target cross Gram matrix)")
    return m


def _solve_in_workspace(
    H: torch.Tensor, W_hat: torch.Tensor, options: _Options, *, dtype: torch.dtype, in_place: bool, started: float
) -> LayerSolution:
    """Take the ``p x p`` workspace (H's own storage when ``in_place`` allows, else a copy of H in ``dtype``) and
    solve in it; a borrowed H is given back whether the solve returns or raises."""
    borrowed = in_place and H.dtype == dtype and is_row_major(H)
    # A copy keeps H's layout when possible, so that in_place=True and False give identical results.
    packed = H if borrowed else square_copy(H, dtype)
    diagonal = packed.diagonal().clone()
    try:
        return _solve(packed, diagonal, H, W_hat, options, started=started)
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


def _damped_targets(source_W: torch.Tensor, W0: torch.Tensor) -> Callable[[float], torch.Tensor]:
    """``lam -> Gb = source @ W_hat + lam W0`` (a new tensor), given ``source @ W_hat``."""
    return lambda lam: torch.add(source_W, W0, alpha=lam)


def _solve(
    packed: torch.Tensor,
    diagonal: torch.Tensor,
    H: torch.Tensor,
    W_hat: torch.Tensor,
    options: _Options,
    *,
    started: float,
) -> LayerSolution:
    """:func:`solve_layer` on the workspace ``packed`` (holding H; H again on return) with ``diag H``; ``H``
    is the caller's matrix (``packed`` itself when borrowed), read only before the workspace is modified.

    Memory, in ``(p, q)`` tensors next to ``packed``: ``W0`` and ``H W0`` (then Gb) until the swept system is
    built, the swept values and Gb during stages A and B, then ``Gb_S`` (solved in place into ``W_S``), the
    output weight and ``D = W - W0`` for the errors. The ``del`` statements below keep it so.
    """
    group_size = options.group_size
    system, Gb, dense = _swept_start(packed, diagonal, H, W_hat, options)
    selection = _select_support(system, options, objective_dense=dense.objective_dense)
    del system

    # Fresh ridge refit on the final support, factored in the workspace's lower triangle.
    kept_groups = torch.nonzero(selection.kept).flatten()
    channels = channels_of(kept_groups, group_size)
    W_S = Gb.index_select(0, channels)
    del Gb
    objective_final = refit_in_place(packed, channels, diagonal, dense.lam, W_S)
    mirror_upper_(packed, diagonal)  # packed is H again (and the caller's H, restored, when borrowed)
    weight = torch.zeros(packed.shape[0], W_hat.shape[1], dtype=packed.dtype, device=packed.device)
    weight.index_copy_(0, channels, W_S)
    del W_S

    pruned_channels = channels_of(torch.nonzero(~selection.kept).flatten(), group_size)
    error, error_masked = _relative_errors(packed, diagonal, W_hat, weight, pruned_channels, dense.denominator)
    _synchronize(packed.device)
    return _layer_solution(
        kept_groups=kept_groups,
        weight=weight.to(device=W_hat.device, dtype=W_hat.dtype),
        dense=dense,
        selection=selection,
        objective_final=objective_final,
        errors=(error, error_masked),
        options=options,
        started=started,
    )


def _swept_start(
    packed: torch.Tensor, diagonal: torch.Tensor, H: torch.Tensor, W_hat: torch.Tensor, options: _Options
) -> tuple[SweptSystem, torch.Tensor, _DenseStart]:
    """Everything that needs all of H before its lower triangle becomes the swept system: the system with every
    channel kept, ``[-Hb^{-1} | Hb^{-1} Gb]``, the targets Gb and the scalars."""
    mirror_upper_(packed, diagonal)  # from here on, only H's upper triangle counts
    if options.cross_gram is None:
        return _plain_start(packed, diagonal, H, W_hat, damping=options.damping)
    return _cross_start(packed, diagonal, H, W_hat, cross_gram=options.cross_gram, damping=options.damping)


def _plain_start(
    packed: torch.Tensor, diagonal: torch.Tensor, H: torch.Tensor, W_hat: torch.Tensor, *, damping: float
) -> tuple[SweptSystem, torch.Tensor, _DenseStart]:
    """:func:`_swept_start` for ``Gb = Hb W0``, whose unconstrained optimum is ``W0`` itself."""
    W0 = _dense_weight(W_hat, diagonal)
    HW0 = packed @ W0
    denominator = inner(W0, HW0)  # tr(W0^T H W0), for the relative errors
    lam, _ = damped_inverse_(packed, diagonal, H, damping)
    Gb = HW0.add_(W0, alpha=lam)
    del HW0
    dense = _DenseStart(lam=lam, objective_dense=-0.5 * inner(Gb, W0), denominator=denominator)
    return SweptSystem(packed, W0), Gb, dense


def _cross_start(
    packed: torch.Tensor,
    diagonal: torch.Tensor,
    H: torch.Tensor,
    W_hat: torch.Tensor,
    *,
    cross_gram: torch.Tensor,
    damping: float,
) -> tuple[SweptSystem, torch.Tensor, _DenseStart]:
    """:func:`_swept_start` for dense targets, ``Gb = C W_hat + lam W0``: a channel dead in the pruned stream may
    live in the dense one, so its dense contribution ``C W_hat`` stays in the targets and only the ridge anchor
    ``W0`` has the dead rows zeroed."""
    W0 = _dense_weight(W_hat, diagonal, zero_dead=False)
    CW = _matmul_rows(cross_gram, W0)
    W0[diagonal == 0] = 0.0
    denominator = quadratic_form(packed, W0)
    lam, W_dense = damped_inverse_(packed, diagonal, H, damping, _damped_targets(CW, W0))
    Gb = CW.add_(W0, alpha=lam)
    del CW, W0
    dense = _DenseStart(lam=lam, objective_dense=-0.5 * inner(Gb, W_dense), denominator=denominator)
    return SweptSystem(packed, W_dense), Gb, dense


def _select_support(system: SweptSystem, options: _Options, *, objective_dense: float) -> _Selection:
    """Stage A, then stage B when ``options.local_search_iters > 0``, on the swept system (updated in place)."""
    device = system.packed.device
    stage_a = eliminate(system, group_size=options.group_size, num_keep=options.num_keep, step=options.step,
                        objective_start=0.0, partitions=options.partitions)
    _synchronize(device)
    stage_a_finished = time.perf_counter()
    objective_stage_a = objective_dense + float(stage_a.objective_curve[-1])

    kept, swaps = stage_a.kept, 0
    before_search = time.perf_counter()
    if options.local_search_iters > 0:
        search = local_search(
            system,
            kept,
            group_size=options.group_size,
            swap_size=options.swap_size,
            max_iters=options.local_search_iters,
            objective_start=objective_stage_a,
            halve_on_failure=options.halve_on_failure,
            partitions=options.partitions,
        )
        kept, swaps = search.kept, search.swaps_accepted
    _synchronize(device)
    return _Selection(kept=kept, stage_a=stage_a, objective_stage_a=objective_stage_a, swaps_accepted=swaps,
                      stage_a_finished=stage_a_finished, seconds_local_search=time.perf_counter() - before_search)


def _relative_errors(
    H: torch.Tensor,
    diagonal: torch.Tensor,
    W_hat: torch.Tensor,
    weight: torch.Tensor,
    pruned_channels: torch.Tensor,
    denominator: float,
) -> tuple[float, float]:
    """Reconstruction errors ``tr(D^T H D) / tr(W0^T H W0)`` with the undamped (full, symmetric) H, for the refit
    ``weight`` (``D = W - W0``) and for W0 masked to the kept support (``D = -W0`` on the pruned rows)."""
    W0 = _dense_weight(W_hat, diagonal)
    error_masked = relative_error(quadratic_form(H, W0, pruned_channels), denominator)
    D = W0.neg_().add_(weight)
    del W0
    return relative_error(quadratic_form(H, D), denominator), error_masked


def _layer_solution(
    *,
    kept_groups: torch.Tensor,
    weight: torch.Tensor,
    dense: _DenseStart,
    selection: _Selection,
    objective_final: float,
    errors: tuple[float, float],
    options: _Options,
    started: float,
) -> LayerSolution:
    """The :class:`LayerSolution` of a solve (logged at debug level); ``errors`` is (refit, masked)."""
    finished = time.perf_counter()
    swaps = selection.swaps_accepted
    # With no swap the support is stage A's: report one value for it, from the fresh refit.
    objective_stage_a = objective_final if swaps == 0 else selection.objective_stage_a
    logger.debug(
        "solve_layer: p=%d m=%d keep=%d step=%d | f dense %.6g, stage A %.6g, final %.6g | %d swaps | "
        "relative error %.4g | %.3fs",
        weight.shape[0],
        weight.shape[0] // options.group_size,
        options.num_keep,
        options.step,
        dense.objective_dense,
        objective_stage_a,
        objective_final,
        swaps,
        errors[0],
        finished - started,
    )
    return LayerSolution(
        kept_groups=kept_groups.to(torch.int64),
        weight=weight,
        objective_dense=dense.objective_dense,
        objective_stage_a=objective_stage_a,
        objective=objective_final,
        relative_error=errors[0],
        removal_order=selection.stage_a.removal_order,
        swaps_accepted=swaps,
        damping_used=dense.lam,
        seconds_stage_a=selection.stage_a_finished - started,
        seconds_local_search=selection.seconds_local_search,
        objective_curve=selection.stage_a.objective_curve + dense.objective_dense,
        curve_num_kept=selection.stage_a.curve_num_kept,
        seconds_total=finished - started,
        relative_error_masked=errors[1],
    )


def _keep_everything(
    H: torch.Tensor, W_hat: torch.Tensor, *, num_groups: int, damping: float, dtype: torch.dtype, started: float
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
        kept_groups=torch.arange(num_groups, dtype=torch.int64, device=device),
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
        curve_num_kept=torch.tensor([num_groups], dtype=torch.int64),
        seconds_total=elapsed,
    )
