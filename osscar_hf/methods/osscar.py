"""OSSCAR (the default) and its exact-greedy variant: the layer-wise combinatorial solver with a ridge refit."""

from __future__ import annotations

from typing import Any

import torch

from ..solver import LayerSolution, solve_layer
from ..solver.packed import square_copy
from ..solver.sweep import channels_of
from .base import GRAM, LayerProblem, PruningMethod, Selection

__all__ = ["ObsGreedy", "Osscar", "solution_report"]


def solution_report(solution: LayerSolution) -> dict[str, Any]:
    """The :class:`~osscar_hf.report.ConsumerReport` figures of a solver solution (the caller times the call)."""
    return {
        "objective_dense": solution.objective_dense,
        "objective_stage_a": solution.objective_stage_a,
        "objective": solution.objective,
        "relative_error": solution.relative_error,
        "relative_error_masked": solution.relative_error_masked,
        "swaps_accepted": solution.swaps_accepted,
        "damping": solution.damping_used,
    }


class Osscar(PruningMethod):
    """Stage A (greedy backward elimination, ``step`` structures at a time), stage B (swap local search), and the
    ridge refit of the kept weights, all on the Gram matrix (ALGORITHM.md sections 2-4)."""

    name = "osscar"
    description = "OSSCAR: combinatorial selection on the layer's Gram matrix, kept weights re-fitted"
    statistics = frozenset({GRAM})
    refits = True
    allocation = "osscar"

    def _solver_arguments(self, problem: LayerProblem) -> dict[str, Any]:
        s = problem.solve
        return {"step": s.step, "local_search_iters": s.local_search_iters, "swap_size": s.swap_size}

    def select(self, problem: LayerProblem) -> Selection:
        stats, settings = problem.statistics, problem.solve
        H = stats.gram
        if H is None:
            raise ValueError(f"method {self.name!r} needs the layer's Gram matrix")
        # The caller drops the Gram after this call, so the solver may use its storage as its p x p workspace. In
        # another solver dtype (a float32 Gram, a float64 solve) the solver would work in a converted copy while
        # the float32 Gram stayed alive: convert it here, in the layout the solver's copy would have, and drop the
        # float32 one before the solve.
        if H.dtype != settings.dtype:
            stats.gram = H = square_copy(H, settings.dtype)
        solution = solve_layer(
            H, problem.weight.detach().T, group_size=problem.group_size, num_keep=problem.num_keep,
            damping=settings.damping, dtype=settings.dtype, cross_gram=stats.cross_gram, in_place=True,
            partitions=problem.partitions, **self._solver_arguments(problem),
        )
        channels = channels_of(solution.kept_groups.cpu(), problem.group_size).to(solution.weight.device)
        weight = solution.weight.index_select(0, channels).T.contiguous()
        return Selection(solution.kept_groups.cpu(), weight=weight, report=solution_report(solution))


class ObsGreedy(Osscar):
    """Exact greedy backward elimination (one structure per step, no local search), with the same refit: the
    OBS / ZipLM-style selection."""

    name = "obs_greedy"
    description = "exact greedy OBS elimination (step 1, no local search), kept weights re-fitted (ZipLM-style)"

    def _solver_arguments(self, problem: LayerProblem) -> dict[str, Any]:
        return {"step": 1, "local_search_iters": 0, "swap_size": 1}
