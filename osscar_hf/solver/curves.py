"""Damage curves: stage A from every group kept down to a floor, with the layer's outputs weighted.

The layer-wise objective counts every output channel alike: ``1/2 ||X (W - W_hat)||^2``. With a positive
definite output weight ``G`` (q x q) the error becomes ``1/2 tr(G (W - W_hat)^T Hb (W - W_hat))``: for ``G`` the
second moment of the loss gradient at the layer's outputs, the (Gauss-Newton) increase of the loss that the error
causes. Writing ``G = L L^T``, that is the plain objective of ``W_hat L``: the same solver, on ``W_hat @ L``, gives
the weighted curve (and refitting ``W L`` rather than ``W`` changes nothing, so the kept supports are those of the
weighted objective).
"""

from __future__ import annotations

import torch

from osscar_hf.solver.layer import solve_layer

__all__ = ["damage_curve", "interpolate_curve", "output_factor"]

RIDGES = (1e-6, 1e-4, 1e-2)  # relative to G's mean diagonal: the first, then the retries of a failed factorisation


def damage_curve(
    H: torch.Tensor,
    W_hat: torch.Tensor,
    *,
    group_size: int,
    floor: int,
    step: int,
    output_gram: torch.Tensor | None = None,
    damping: float = 0.01,
    dtype: torch.dtype = torch.float64,
    partitions: int = 1,
) -> tuple[list[int], list[float]]:
    """Kept group counts (from all ``m`` down to ``floor``, in steps of about ``step``) and the increase of the
    (output-weighted) objective at each, from stage A's nested removal order. ``H`` is not modified.

    With ``partitions`` (equal counts per partition, see :mod:`osscar_hf.solver.partitions`) the counts are the
    balanced ones, ``m``, ``m - partitions``, ... down to ``floor`` (a multiple of ``partitions``), each from its
    own constrained stage A (a balanced support of one level need not hold the next level's), the damage made
    non-decreasing."""
    W = W_hat.to(dtype)
    if output_gram is not None:
        W = W @ output_factor(output_gram, dtype)
    m = W.shape[0] // group_size
    if floor >= m:
        return [m], [0.0]
    if partitions > 1:
        return _balanced_curve(H, W, group_size=group_size, floor=floor, damping=damping, dtype=dtype,
                               partitions=partitions)
    solution = solve_layer(H, W, group_size=group_size, num_keep=floor, step=step, local_search_iters=0,
                           swap_size=1, damping=damping, dtype=dtype)
    curve = solution.objective_curve.double()
    return [int(k) for k in solution.curve_num_kept.tolist()], (curve - curve[0]).tolist()


def output_factor(output_gram: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``L`` with ``L L^T = G + ridge I`` (``ridge`` relative to G's mean diagonal), in ``dtype``. A factorisation
    that fails in ``dtype`` (a rank-deficient ``G``: few gradient rows, or output channels that get none) is
    retried in float64, then with more ridge; a clear error if none succeeds."""
    scale = float(output_gram.diagonal().double().mean()) if output_gram.shape[0] else 0.0
    attempts = [(dtype, RIDGES[0])] + [(torch.float64, ridge) for ridge in RIDGES]
    for attempt_dtype, relative in attempts:
        G = output_gram.to(attempt_dtype)
        ridge = relative * scale if scale > 0 else 1e-12
        L, info = torch.linalg.cholesky_ex(G + ridge * torch.eye(G.shape[0], dtype=attempt_dtype, device=G.device))
        if int(info) == 0:
            return L.to(dtype)
    raise ValueError(f"the output-gradient second moment ({output_gram.shape[0]} x {output_gram.shape[0]}) is not "
                     f"positive definite even with a ridge of {RIDGES[-1]} x its mean diagonal ({scale:.3g})")


def _balanced_curve(H: torch.Tensor, W: torch.Tensor, *, group_size: int, floor: int, damping: float,
                    dtype: torch.dtype, partitions: int) -> tuple[list[int], list[float]]:
    m = W.shape[0] // group_size
    kept, damage = [m], [0.0]
    for num_keep in range(m - partitions, floor - 1, -partitions):
        solution = solve_layer(H, W, group_size=group_size, num_keep=num_keep, step=1, local_search_iters=0,
                               swap_size=1, damping=damping, dtype=dtype, partitions=partitions)
        kept.append(num_keep)
        damage.append(max(damage[-1], solution.objective - solution.objective_dense))
    return kept, damage


def interpolate_curve(sizes: list[int], damage: list[float], at: list[int]) -> list[float]:
    """The damage at the kept counts ``at``, linear between the curve's points (``sizes`` decreasing); below the
    last point, extended with the last segment's slope."""
    out = []
    for k in at:
        if k >= sizes[0]:
            out.append(damage[0])
            continue
        j = next((i for i in range(1, len(sizes)) if sizes[i] <= k), len(sizes) - 1)
        k0, k1, d0, d1 = sizes[j - 1], sizes[j], damage[j - 1], damage[j]
        out.append(d0 + (d1 - d0) * (k0 - k) / (k0 - k1) if k0 != k1 else d1)
    return out
