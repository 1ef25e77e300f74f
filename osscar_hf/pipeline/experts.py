"""The MLP of a mixture of experts: one layer-wise problem per expert, the same number of neurons kept in each.

Every expert's statistics come from the tokens the router sends to it, each token's input scaled by its routing
weight (:func:`osscar_hf.pipeline.statistics.expert_inputs`). An expert that gets no calibration token keeps its
neurons of largest down-projection column norm, unchanged; one that gets fewer tokens than it has neurons is solved
with ten times the damping; both are logged.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
import math
import time
from typing import Any

import torch
import torch.nn as nn

from ..arch.experts import EXPERT_ALIGNMENT, expert_parameter, expert_parameter_name
from ..arch.spec import ArchSpec
from ..errors import OsscarConfigError
from ..methods import get_method
from ..methods.base import LayerProblem, LayerStatistics, Selection, group_sums, top_groups
from ..surgery import expert_neurons
from .settings import LoopSettings
from .statistics import ExpertStatistics

__all__ = ["EXPERT_ALIGNMENT", "FEW_TOKENS_DAMPING", "aligned_experts_config", "check_experts_fit", "expert_statistics",
           "combine_experts", "expert_solver", "routed_producer"]

logger = logging.getLogger(__name__)

FEW_TOKENS_DAMPING = 10.0  # damping factor for an expert with fewer calibration tokens than neurons


def check_experts_fit(config: Any, spec: ArchSpec) -> None:
    """Refuse, before any data is read, what a mixture of experts cannot take: bias compensation (experts have no
    bias), dense targets (the dense stream routes its tokens to other experts) and the global allocation (its damage
    curves are per consumer, the experts are many)."""
    if spec.experts is None:
        return
    family = f"the mixture of experts of spec {spec.name!r}"
    if get_method(config.method).adds_bias:
        raise OsscarConfigError(f"method={config.method!r} compensates with an output bias, which {family} has no "
                                "place for; use method='wanda_sp' (scores, no refit) or 'osscar'")
    if config.dense_targets:
        raise OsscarConfigError(f"dense_targets=True is not supported for {family} (the dense and pruned streams "
                                "route tokens to different experts); use dense_targets=False")
    if config.sparsity is not None and config.block_sizes is None and config.resolved_allocation() != "uniform":
        raise OsscarConfigError(
            f"allocation={config.allocation!r} with sparsity= (method {config.method!r}'s global allocation, whose "
            f"damage curves are per consumer) is not supported for {family}; use allocation='uniform', "
            "attention_sparsity/mlp_sparsity or block_sizes")


def aligned_experts_config(config: Any, spec: ArchSpec, model_config: Any) -> Any:
    """``config`` with ``round_to`` a multiple of :data:`EXPERT_ALIGNMENT` for a mixture of experts (logged when it
    changes); explicit ``block_sizes`` whose neuron counts are not are refused, naming the alignment."""
    if spec.experts is None or config.round_to % EXPERT_ALIGNMENT == 0:
        return config
    round_to = math.lcm(config.round_to, EXPERT_ALIGNMENT)
    for i, entry in enumerate(config.block_sizes or []):
        if entry["mlp"] % round_to and entry["mlp"] != spec.ffn_dim(model_config):
            raise OsscarConfigError(
                f"block_sizes[{i}]['mlp'] = {entry['mlp']}: the experts of spec {spec.name!r} keep a multiple of "
                f"{round_to} neurons each (transformers' grouped_mm experts need rows of a multiple of 16 bytes; "
                f"round_to={config.round_to}) or all of them")
    logger.info("mixture of experts: kept neurons per expert rounded to multiples of %d (round_to=%d; transformers' "
                "grouped_mm experts need rows of a multiple of 16 bytes)", round_to, round_to)
    return dataclasses.replace(config, round_to=round_to)


def routed_producer(spec: ArchSpec) -> str:
    """The name, in the experts module, of the [gate | up] parameter whose outputs feed the down projection."""
    assert spec.experts is not None
    return expert_parameter_name(spec.experts, spec.producers("mlp")[0].path)


def expert_statistics(block: nn.Module, spec: ArchSpec, settings: LoopSettings) -> ExpertStatistics:
    """Empty per-expert statistics of the method's kind for ``block``'s experts."""
    assert spec.experts is not None
    down = expert_parameter(block, spec.experts, spec.mlp_consumer)
    return ExpertStatistics(down.shape[0], down.shape[2], settings.device, settings.method.statistics)


def _magnitude(weight: torch.Tensor, keep: int) -> Selection:
    return Selection(top_groups(group_sums(weight.detach().double().pow(2).sum(0), 1), keep))


def _select_one(e: int, weight: torch.Tensor, stats: LayerStatistics, settings: LoopSettings, keep: int,
                where: str) -> Selection:
    method = settings.method
    if method.statistics and stats.tokens == 0:
        logger.info("%s expert %d: no calibration token routed to it; its %d neurons of largest down-projection "
                    "column norm are kept, not refit", where, e, keep)
        return _magnitude(weight, keep)
    solve = settings.mlp
    if method.statistics and stats.tokens < weight.shape[1]:
        logger.info("%s expert %d: only %d calibration tokens for %d neurons; damping x%g", where, e, stats.tokens,
                    weight.shape[1], FEW_TOKENS_DAMPING)
        solve = dataclasses.replace(solve, damping=solve.damping * FEW_TOKENS_DAMPING)
    problem = LayerProblem(weight=weight, bias=None, num_keep=keep, group_size=1, statistics=stats, solve=solve)
    return method.select(problem)


def _combined_report(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report for the experts: summed objectives and swaps, mean relative errors, the largest damping."""
    out: dict[str, Any] = {}
    for key in ("objective_dense", "objective_stage_a", "objective", "swaps_accepted"):
        values = [r[key] for r in reports if r.get(key) is not None]
        if values:
            out[key] = type(values[0])(sum(values))
    for key in ("relative_error", "relative_error_masked"):
        values = [r[key] for r in reports if r.get(key) is not None]
        if values:
            out[key] = sum(values) / len(values)
    damping = [r["damping"] for r in reports if r.get("damping") is not None]
    if damping:
        out["damping"] = max(damping)
    return out


def expert_solver(block: nn.Module, spec: ArchSpec, stats: ExpertStatistics | None, settings: LoopSettings, keep: int,
                  where: str) -> tuple[int, Callable[[int], Selection]]:
    """(the number of experts, ``solve(e)``: expert ``e``'s selection of ``keep`` neurons). Each expert is its own
    problem, so the experts can be solved apart (by different ranks) and put together by :func:`combine_experts`."""
    assert spec.experts is not None
    down = expert_parameter(block, spec.experts, spec.mlp_consumer)

    def solve(e: int) -> Selection:
        return _select_one(e, down[e], stats.take(e) if stats is not None else LayerStatistics(), settings, keep,
                           where)

    return down.shape[0], solve


def combine_experts(block: nn.Module, spec: ArchSpec, selections: list[Selection]) -> Selection:
    """Every expert's selection as one :class:`Selection` over the flat structures ``e * I + j`` (its weight experts
    x out x keep when the method refits), with one report for them all."""
    assert spec.experts is not None
    down = expert_parameter(block, spec.experts, spec.mlp_consumer)
    kept = expert_neurons(torch.stack([s.kept_groups.cpu() for s in selections]), down.shape[2])
    weight = None
    if any(s.weight is not None for s in selections):
        weight = torch.stack([s.weight.to(down) if s.weight is not None
                              else down[e].index_select(1, s.kept_groups.to(down.device))
                              for e, s in enumerate(selections)])
    return Selection(kept, weight=weight, report=_combined_report([s.report or {} for s in selections]))

