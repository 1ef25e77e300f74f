"""One CNN block at a time: for each of its channel problems in series, accumulate the consumer's Gram over its
unfolded inputs, select, slice the producers and refit the consumer; then propagate (ALGORITHM.md sections 5, 8).

:class:`ChannelBlockStream` is the block stream of the one orchestration (:func:`osscar_hf.pipeline.prune_blocks`)
for a CNN: it keeps :class:`~osscar_hf.pipeline.block.BlockStream`'s activation streams (in memory or on disk) and
replaces what one block's pruning is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..arch import get_submodule
from ..arch.vision import ChannelProblem, VisionSpec
from ..activations import ActivationSpace
from ..capture import CapturedInputs, call_block, capture_block_inputs, move_to
from ..channel_surgery import consumer_ops, keep_input_channels, keep_output_channels
from ..config import keep_count
from ..host_memory import peak_host_rss_bytes
from ..methods import LayerProblem, LayerStatistics, PruningMethod, SolveSettings
from ..report import ChannelBlockReport, ConsumerReport
from .block import BlockStream, consumer_report, block_device, propagate_block
from .statistics import InputStatistics, input_hooks

__all__ = ["ChannelBlockStream", "ChannelSettings", "capture_channel_inputs"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelSettings:
    """What the CNN block loop needs, resolved from an :class:`~osscar_hf.config.OsscarConfig`."""

    method: PruningMethod
    solve: SolveSettings
    channel_sparsity: float
    device: torch.device
    storage_device: torch.device
    activation_storage: str = "memory"
    activation_dir: str | None = None
    dense_targets: bool = False  # what the activation space sizes for (one stream)
    # Kept channels of every block's problems, in order (a global budget); None: ``channel_sparsity`` everywhere.
    widths: tuple[tuple[int, ...], ...] | None = None

    def keep(self, width: int, block: int | None = None, problem: int = 0) -> int:
        """Channels kept of an inner width (problem ``problem`` of block ``block``)."""
        if self.widths is not None and block is not None:
            return self.widths[block][problem]
        return keep_count(width, self.channel_sparsity)


class ChannelBlockStream(BlockStream):
    """Prunes CNN blocks one at a time, in order, carrying the calibration activations from each to the next."""

    def __init__(self, spec: VisionSpec, captured: CapturedInputs, settings: ChannelSettings) -> None:
        super().__init__(spec, captured, settings)  # type: ignore[arg-type]

    def prune(self, index: int, block: nn.Module) -> ChannelBlockReport:
        """Solve block ``index``'s channel problems in series and slice it in place; it goes back to its own device,
        also on errors."""
        settings = self.settings
        device = settings.device
        start = time.perf_counter()
        home = block_device(block)
        try:
            block.to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.no_grad():
                problems = [self._solve(block, index, j, problem)
                            for j, problem in enumerate(self.spec.layout(block))]
                states = propagate_block(block, self.states, self.kwargs[index], device, settings.storage_device,
                                         self.space)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        finally:
            block.to(home)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        self._advance(states, None)
        return ChannelBlockReport(index=index, problems=problems, seconds=time.perf_counter() - start,
                                  peak_device_memory_bytes=peak, peak_host_rss_bytes=peak_host_rss_bytes())

    def _solve(self, block: nn.Module, index: int, position: int, problem: ChannelProblem) -> ConsumerReport:
        settings = self.settings
        consumer = get_submodule(block, problem.consumer)
        ops = consumer_ops(consumer)
        width = ops.width(consumer)
        keep = settings.keep(width, index, position)
        if keep == width:
            return consumer_report(width, None, 0.0)
        started = time.perf_counter()
        matrix = ops.matrix(consumer)
        statistics = LayerStatistics()
        if settings.method.statistics:
            stats = InputStatistics(matrix.shape[1], settings.device, settings.method.statistics, False)
            self._accumulate(block, index, consumer, lambda x: stats.add(ops.rows(consumer, x)))
            statistics = stats.take()
        selection = settings.method.select(LayerProblem(
            weight=matrix, bias=consumer.bias, group_size=ops.group_size(consumer), num_keep=keep,
            statistics=statistics, solve=settings.solve))
        del statistics
        for path in problem.producers:
            keep_output_channels(get_submodule(block, path), selection.kept_groups)
        keep_input_channels(consumer, selection.kept_groups, selection.weight)
        return consumer_report(width, selection, time.perf_counter() - started)

    def _accumulate(self, block: nn.Module, index: int, consumer: nn.Module, add: Any) -> None:
        """Run the block on every batch, handing the consumer's input to ``add``."""
        device = self.settings.device
        with input_hooks({"consumer": consumer}, lambda _name, x: add(x)):
            for b, state in enumerate(self.states):
                call_block(block, state.to(device), move_to(self.kwargs[index][b], device))
                del state

    def replay(self, index: int, block: nn.Module, *, pruned: bool) -> None:
        raise NotImplementedError("CNN pruning runs in memory in one go: there is no interrupted run to resume")

    @staticmethod
    def announce(bar: Any, report: ChannelBlockReport) -> None:
        """Progress-bar postfix and log line of one pruned block."""
        errors = [f"{p.relative_error_masked:.2e}->{p.relative_error:.2e}" for p in report.problems
                  if p.solved and p.relative_error is not None and p.relative_error_masked is not None]
        bar.set_postfix({"s": f"{report.seconds:.1f}", **({"err": ", ".join(errors)} if errors else {})})
        bar.update(1)
        logger.info("block %d: kept channels %s (rel. err masked->refit %s), %.2fs", report.index,
                    ", ".join(f"{p.kept}/{p.structures}" for p in report.problems), ", ".join(errors) or "-",
                    report.seconds)


def capture_channel_inputs(run: Any, space: ActivationSpace) -> CapturedInputs:
    """Block 0's inputs for ``run``'s calibration pixels (a :class:`~osscar_hf.pipeline.vision.ChannelRun`; none
    for a method without statistics)."""
    blocks = run.blocks
    if run.pixel_values is None:
        return CapturedInputs(hidden=[], kwargs=[[] for _ in range(len(blocks))])
    return capture_block_inputs(run.model, blocks, run.pixel_values, batch_size=run.config.batch_size,
                                storage_device=run.settings.storage_device, activations=space,
                                model_inputs=lambda batch: {"pixel_values": batch})
