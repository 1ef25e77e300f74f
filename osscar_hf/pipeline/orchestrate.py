"""The one orchestration of a pruning run, for a model in memory (``OsscarPruner.prune``) and for a checkpoint
streamed from its shards (``OsscarPruner.prune_checkpoint``).

A run is: checks and settings from the config and the model's shapes (:func:`start_run`, before any weight or
data is read where the caller can arrange it); the calibration windows; the capture of block 0's inputs; the
plan of every block's kept sizes (:func:`plan_sizes`: fixed by the config, or measured by a dense pass over the
blocks for a global allocation); the pruning pass over the blocks (:func:`prune_blocks`); the config update and
the report (:func:`finish_run`).

Where the blocks' weights live is the one thing that differs, and it is behind :class:`BlockSource`: in memory the
blocks are simply there; when streaming, :mod:`osscar_hf.streaming` reads each block from the shards before it is
used and writes (and releases) it after.
"""

from __future__ import annotations

import functools
import math
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..arch import ArchSpec, get_submodule
from ..budgets import BlockSize, block_geometries, check_budget, plan_fixed_sizes
from ..activations import ActivationSpace, ActivationStore
from .. import capture as capture_module
from ..capture import CapturedInputs
from ..config import OsscarConfig, describe_dataset
from ..distributed import SINGLE, Ranks, broadcast, step
from ..errors import OsscarConfigError, UnsupportedModelError
from ..evaluation import context_length, count_parameters
from ..io.model_config import update_model_config
from ..methods import get_method
from ..report import BlockReport, PruneReport
from ..self_calibration import is_self_dataset, self_sampling_provenance
from ..surgery import part_linears
from . import measure  # a module, so that a test can wrap measure.measured_sizes
from .block import BlockStream
from .experts import aligned_experts_config, check_experts_fit
from .kept import KeptStatisticsStream
from .run import BlockSource, InMemoryBlocks, PruneRun, scratch_copy  # re-exported: their old place
from .sensitivity import held_out_shares
from .settings import LoopSettings, loop_settings

__all__ = [
    "BlockSource", "InMemoryBlocks", "PruneRun", "activation_space", "capture", "check_config_fits", "finish_run",
    "measures_on_held_out",
    "plan_sizes", "prune_blocks", "run_report", "scratch_copy", "start_run",
]

logger = logging.getLogger(__name__)


def check_method_fits(config: OsscarConfig, model: nn.Module, spec: ArchSpec) -> None:
    """Refuse a method the architecture cannot hold (an output bias where the config cannot switch one on)."""
    method_name = config.method
    if not get_method(method_name).adds_bias:
        return
    blocks = get_submodule(model, spec.blocks)
    for part, linears in part_linears(blocks[0], spec).items():
        if linears[-1].bias is None and not hasattr(spec.shape_config(model.config), spec.bias_switches.get(part, "")):
            raise UnsupportedModelError(
                f"method {method_name!r} gives the {part} output projection a bias, but model_type "
                f"{model.config.model_type!r} has no config field that switches such biases on (llama's "
                f"attention_bias/mlp_bias; opt has the biases already); use another method")


def check_attention_fits(config: OsscarConfig, spec: ArchSpec, model_config: Any) -> None:
    """Refuse attention pruning for a family whose attention cannot be pruned (``spec.attention_fixed``), naming what
    asked for it and what to give instead."""
    if spec.attention_fixed is None:
        return
    full = spec.num_kv_heads(model_config)
    asks = [f"attention_sparsity={config.attention_sparsity}"] if config.attention_sparsity else []
    if config.attention_structure != "kv_groups":
        asks.append(f"attention_structure={config.attention_structure!r}")
    asks += [f"block_sizes[{i}]['attention'] = {entry['attention']}"
             for i, entry in enumerate(config.block_sizes or []) if entry["attention"] != full][:1]
    if asks:
        raise OsscarConfigError(
            f"{', '.join(asks)}: the attention of spec {spec.name!r} cannot be pruned ({spec.attention_fixed}); prune "
            f"its MLP only: attention_sparsity=0, block_sizes with 'attention': {full}, or sparsity= (which then "
            "spends the whole budget on the MLP)")


def check_config_fits(config: OsscarConfig, spec: ArchSpec, model_config: Any) -> None:
    """What the config and the model's ``config.json`` alone refuse (before any weight is loaded): a CNN's
    ``channel_sparsity``, what a mixture of experts cannot take, and attention pruning where the family's attention
    is fixed."""
    if config.channel_sparsity:
        raise OsscarConfigError(
            f"channel_sparsity={config.channel_sparsity} prunes a CNN's channels, but model_type "
            f"{getattr(model_config, 'model_type', None)!r} is a language model: give attention_sparsity / "
            "mlp_sparsity, sparsity or block_sizes instead")
    check_experts_fit(config, spec)
    check_attention_fits(config, spec, model_config)


def calibration_seq_len(config: OsscarConfig, model_config: Any) -> int:
    """``config.seq_len`` capped at the model's context length."""
    context = context_length(model_config)
    return min(config.seq_len, context) if context else config.seq_len


def start_run(config: OsscarConfig, model: nn.Module, spec: ArchSpec,
              windows: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]], ranks: Ranks = SINGLE) -> PruneRun:
    """Check the config against the model's shapes, resolve the settings and the fixed sizes, then build the
    calibration windows (``windows(held_out)``: the calibration windows, and ``held_out`` more for a plan that
    measures on held-out data) if anything needs them. ``model`` may be a meta skeleton; no weight is read here.
    Raises before any data is read when the method is unknown, the budget is impossible or the method does not
    fit. Every one of ``ranks`` builds all the windows (the run's fingerprint and report name them all); each
    captures only its share (:func:`capture`)."""
    config.check_method()
    check_config_fits(config, spec, model.config)
    config = aligned_experts_config(config, spec, model.config)
    check_method_fits(config, model, spec)
    settings = loop_settings(config, model.config, spec, ranks)
    geometries = block_geometries(model, spec, seq_len=calibration_seq_len(config, model.config),
                                  with_biases=settings.method.adds_bias,
                                  attention_structure=config.attention_structure)
    check_budget(config, geometries)
    fixed = plan_fixed_sizes(config, geometries)
    if fixed is not None:
        settings = settings.with_sizes(fixed)
    run = PruneRun(config=config, model=model, spec=spec, settings=settings, geometries=geometries, windows=None,
                   params_before=count_parameters(model))
    if run.needs_calibration:
        held_out = config.allocation_samples if measures_on_held_out(config) else 0
        run.windows, run.held_out = windows(held_out)
    else:
        logger.info("method %r needs no calibration data: none is read", config.method)
    return run


def measures_on_held_out(config: OsscarConfig) -> bool:
    """Whether the plan measures damage on held-out windows (OSSCAR's global allocation)."""
    return config.sparsity is not None and config.resolved_allocation() == "osscar"


def activation_space(run: PruneRun) -> ActivationSpace:
    """The space for the run's activations, sized (for ``activation_storage="auto"``) for what the run holds at
    once: the loop's streams, and while OSSCAR's allocation is measured, the captured inputs, the first prune's
    streams and every block's inputs for the held-out windows."""
    space = ActivationSpace.for_settings(run.settings)
    if plans_on_held_out(run):
        held_out_streams = (len(run.blocks) + 1) * run.config.allocation_samples / run.config.num_samples
        space.streams = max(space.streams, 3 + math.ceil(held_out_streams))
    return space


def plans_on_held_out(run: PruneRun) -> bool:
    """Whether this run still has to measure its plan on held-out windows (not when a resumed run has it)."""
    return run.held_out is not None and not run.settings.sizes


def capture(run: PruneRun, space: ActivationSpace) -> CapturedInputs:
    """Block 0's inputs for the calibration windows, into ``space`` (nothing when the run reads no data); those
    of the held-out windows go to ``run.held_out_inputs`` when the plan is still to be measured."""
    if run.windows is None:
        return CapturedInputs(hidden=[], kwargs=[[] for _ in run.blocks])
    options = dict(batch_size=run.config.batch_size, storage_device=run.settings.storage_device, activations=space)
    windows = rank_windows(run.windows, run.config.batch_size, run.settings.ranks)
    captured = capture_module.capture_block_inputs(run.model, run.blocks, windows, **options)
    if plans_on_held_out(run):  # after the calibration windows, which settle where the space keeps them
        ranks = run.settings.ranks
        shares = held_out_shares(run.held_out.shape[0], ranks)
        if shares is None and ranks.distributed:
            logger.info("%d held-out windows for %d ranks: every rank measures the allocation on all of them",
                        run.held_out.shape[0], ranks.world_size)
        share = range(run.held_out.shape[0]) if shares is None else shares[ranks.rank]
        own = run.held_out[share.start:share.stop]
        run.held_out_inputs = capture_module.capture_block_inputs(run.model, run.blocks, own, **options)
    return captured


def rank_windows(windows: torch.Tensor, batch_size: int, ranks: Ranks) -> torch.Tensor:
    """This rank's share of the calibration ``windows``: whole batches of ``batch_size`` (so that each batch is the
    one a single process runs), a contiguous run of them per rank; all of them for a single process."""
    if not ranks.distributed:
        return windows
    batches = math.ceil(windows.shape[0] / batch_size)
    if batches < ranks.world_size:
        raise OsscarConfigError(
            f"num_samples={windows.shape[0]} windows in batches of batch_size={batch_size} make {batches} batches, "
            f"fewer than the {ranks.world_size} ranks: every rank needs one; raise num_samples or lower batch_size")
    share = ranks.share(batches)
    return windows[share.start * batch_size:share.stop * batch_size]


def plan_sizes(run: PruneRun, source: BlockSource, captured: CapturedInputs, *, progress: bool = True) -> None:
    """Settle every block's kept sizes (``run.settings.sizes``): fixed by the config already, or measured by a
    pass over the blocks for a global allocation (see :mod:`.measure`)."""
    if not run.settings.sizes:
        started = time.perf_counter()
        try:
            with step(run.settings.ranks):
                sizes = measure.measured_sizes(run, source, captured, progress=progress)
            sizes = broadcast(sizes, run.settings.ranks)  # rank 0's plan: the same on every rank, whatever rounding
        finally:  # the held-out windows served the plan alone
            if run.held_out_inputs is not None and isinstance(run.held_out_inputs.hidden, ActivationStore):
                run.held_out_inputs.hidden.close()
            run.held_out_inputs = None
        check_sizes(sizes, run.settings)
        run.settings = run.settings.with_sizes(sizes)
        run.plan_seconds = time.perf_counter() - started
    announce_plan(run)


def announce_plan(run: PruneRun) -> None:
    settings = run.settings
    sizes = settings.sizes
    shapes = ", ".join(f"{s.attention}/{s.mlp}" for s in sizes[:8]) + (" ..." if len(sizes) > 8 else "")
    data = "" if run.windows is None else f"; {run.windows.shape[0]} windows of {run.windows.shape[1]} tokens"
    logger.info("%s (%s): %d blocks of %d attention structures and %d neurons; kept per block (attention/mlp): "
                "%s%s", run.config.method, run.spec.name, len(sizes), settings.attention_structures,
                settings.num_neurons, shapes, data)


def prune_blocks(
    run: PruneRun,
    source: BlockSource,
    captured: CapturedInputs,
    *,
    progress: bool = True,
    finished: list[BlockReport] | None = None,
    replay: Callable[[int, nn.Module, BlockStream], None] | None = None,
    description: str = "OSSCAR pruning",
    stream: Callable[[Any, CapturedInputs, Any], BlockStream] = BlockStream,
) -> list[BlockReport]:
    """Prune every block to ``run.settings.sizes`` in turn (ALGORITHM.md section 5); return the block reports.

    ``finished``: reports of blocks an interrupted run already pruned; their inputs are replayed by
    ``replay(index, block, stream)`` (which moves the stream past the block; None when the blocks are solved on the
    Grams the planning kept, :mod:`.kept`) instead of solving them again. Takes
    ownership of ``captured.hidden`` and releases every stream at the end, also on errors (see
    :class:`BlockStream`); every block goes back to its own device, also when an error stops the loop.
    ``stream``: the block stream's class, what pruning one block is (a CNN's:
    :class:`~osscar_hf.pipeline.channels.ChannelBlockStream`).
    """
    blocks = run.blocks
    done = list(finished or [])
    reports: list[BlockReport] = []
    kept = stream is BlockStream and kept_for(source, range(len(done), len(blocks)))
    if kept:  # no stream to move past the finished blocks: they only take their shapes back
        stream = functools.partial(KeptStatisticsStream, source=source)
        logger.info("pruning every block on the Gram matrices of the planning's uniform first prune")
    with stream(run.spec, captured, run.settings) as blocks_stream:
        bar = tqdm(total=len(done), desc=f"{description}: resuming (outputs of finished blocks)", unit="block",
                   disable=not progress or not done)
        try:
            for index, report in enumerate(done):
                if replay is not None:
                    replay(index, blocks[index], None if kept else blocks_stream)
                reports.append(report)
                bar.update(1)
            bar.close()
            # The pruning bar starts at the finished blocks' count, so its rate and ETA are those of the blocks left.
            bar = tqdm(total=len(blocks), initial=len(done), desc=description, unit="block", disable=not progress)
            for index in range(len(done), len(blocks)):
                block = blocks[index]
                source.load(index, block)
                report = blocks_stream.prune(index, block)
                source.store(index, block, report)
                reports.append(report)
                blocks_stream.announce(bar, report)
        finally:
            bar.close()
    return reports


def kept_for(source: BlockSource, indices: range) -> bool:
    """Whether ``source`` holds kept statistics (:mod:`.kept`) for every block of ``indices`` (some at least)."""
    return len(indices) > 0 and all(source.has_statistics(i) for i in indices)


def finish_run(run: PruneRun, reports: list[BlockReport], activations: dict[str, Any] | None = None) -> PruneReport:
    """Write the pruned shapes into the model's config (when anything was pruned) and build the report."""
    settings = run.settings
    if any(b.attention.solved or b.mlp.solved for b in reports):
        update_model_config(run.model, run.spec, n_rep=settings.n_rep, head_dim=settings.head_dim,
                            osscar_config=run.config)
    return build_report(run, reports, count_parameters(run.model), activations)


def build_report(run: PruneRun, reports: list[BlockReport], params_after: int,
                 activations: dict[str, Any] | None = None) -> PruneReport:
    config, windows = run.config, run.windows
    calibration: dict[str, Any] = ({"num_samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                                    "tokens": int(windows.numel())} if windows is not None
                                   else {"num_samples": 0, "seq_len": 0, "tokens": 0})
    if windows is not None and is_self_dataset(config.dataset):
        held_out = int(run.held_out.shape[0]) if run.held_out is not None else 0
        calibration["sampled_from_model"] = self_sampling_provenance(run.model.config, seed=config.seed,
                                                                     held_out=held_out)
    return run_report(run, calibration, reports, params_after, activations, budget_summary(run, reports))


def run_report(run: Any, calibration: dict[str, Any], reports: list[Any], params_after: int,
               activations: dict[str, Any] | None, budget: dict[str, Any]) -> PruneReport:
    """The report of a finished run (a language model's :class:`PruneRun` or a CNN's run: the same fields)."""
    config = run.config
    return PruneReport(
        model_type=run.model.config.model_type,
        config=config.to_dict() | {"dataset": describe_dataset(config.dataset, config.text_column)},
        calibration=calibration,
        parameters_before=run.params_before,
        parameters_after=params_after,
        total_seconds=time.perf_counter() - run.started,
        blocks=reports,
        activations=activations,
        budget=budget,
    )


def budget_summary(run: PruneRun, reports: list[BlockReport]) -> dict[str, Any]:
    """What the plan asked for and what the blocks got: the method, how sizes were chosen, the decoder blocks'
    parameters and multiply-adds per token before and after."""
    config, geometries = run.config, run.geometries
    layout = run.settings.attention_layout  # a report counts the solver's groups (query heads, or KV groups)
    kept = [(layout.structures_of_solver_kept(r.attention.kept), r.mlp.kept_per_expert) for r in reports]
    dense = [(g.attention_structures, g.mlp_structures) for g in geometries]
    summary: dict[str, Any] = {"method": config.method, "allocation": _allocation_name(config)}
    for target in ("params", "flops"):
        before = sum(g.cost(target, *d) for g, d in zip(geometries, dense))
        after = sum(g.cost(target, *k) for g, k in zip(geometries, kept))
        summary[f"block_{target}_before"] = before
        summary[f"block_{target}_after"] = after
        summary[f"block_{target}_removed"] = 1.0 - after / before if before else 0.0
    if config.sparsity is not None:
        summary.update(sparsity=config.sparsity, sparsity_target=config.sparsity_target)
    summary["plan_seconds"] = run.plan_seconds
    if run.search_summary is not None:
        summary["allocation_search"] = dict(run.search_summary)
    return summary


def _allocation_name(config: OsscarConfig) -> str:
    if config.block_sizes is not None:
        return "explicit"
    if config.sparsity is None:
        return "uniform fractions"
    return config.resolved_allocation()


def check_sizes(sizes: list[BlockSize], settings: LoopSettings) -> None:
    """Refuse sizes outside a block's structure counts (a plan bug or a bad explicit list)."""
    for i, size in enumerate(sizes):
        if not (0 <= size.attention <= settings.attention_structures and 0 <= size.mlp <= settings.num_neurons):
            raise OsscarConfigError(f"block {i}: kept sizes {size.to_dict()} outside the block's "
                                    f"{settings.attention_structures} attention structures and "
                                    f"{settings.num_neurons} neurons")
