"""The planning of a global allocation, before any block is pruned: each allocation (``_ALLOCATIONS``, by name)
measures what it needs and returns every block's sizes.

* ``"flap"``: one pass over the blocks on the dense model (:func:`dense_pass`): each block (loaded from its
  :class:`~osscar_hf.pipeline.run.BlockSource`, released after) runs on the dense stream of block inputs
  and the statistics of its two consumers give FLAP's standardised scores, ranked globally.
* ``"osscar"``: a uniform first prune of planning copies, then a backward sweep of the loss's sensitivity on
  held-out windows (two passes, :mod:`.sensitivity`); with ``allocation_search``, a search from that plan that
  evaluates whole pruned models on the held-out windows (:mod:`.search`).

Both work on copies of the captured block-0 inputs, so the pruning pass that follows starts from the same inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..activations import ActivationStore
from ..budgets import BlockSize, flap_sizes, level_scores, part_floors, standardised_structure_scores
from ..capture import CapturedInputs, call_block, move_to
from ..distributed import reduce_statistics, step
from ..methods import LayerProblem, LayerStatistics, get_method
from .block import PARTS, block_consumers, block_device
from .run import BlockSource, PruneRun
from .search import search_sizes
from .sensitivity import sensitivity_sizes
from .statistics import InputStatistics, input_hooks

__all__ = ["dense_pass", "measured_sizes"]

logger = logging.getLogger(__name__)

BlockStatistics = dict[str, LayerStatistics]


def dense_pass(
    run: PruneRun,
    source: BlockSource,
    captured: CapturedInputs,
    needs: frozenset[str],
    on_block: Callable[[int, nn.Module, BlockStatistics], None],
    *,
    progress: bool = True,
    description: str = "planning",
) -> None:
    """Run every dense block in turn on the captured inputs, accumulating its consumers' input statistics
    (``needs``), and call ``on_block(index, block, statistics)`` while the block is loaded."""
    settings = run.settings
    device, storage = settings.device, settings.storage_device
    if not isinstance(captured.hidden, ActivationStore):
        raise TypeError("the planning pass needs the captured inputs in an activation store")
    states = captured.hidden.copy()
    bar = tqdm(total=len(run.blocks), desc=f"{run.config.method} {description}", unit="block", disable=not progress)
    try:
        for index, block in enumerate(run.blocks):
            source.load(index, block)
            home = block_device(block)
            try:
                block.to(device)
                consumers = block_consumers(block, run.spec)
                stats = {part: InputStatistics(consumers[part].in_features, device, needs, cross=False)
                         for part in PARTS}
                outputs = states.space.store()
                try:
                    with step(settings.ranks), torch.no_grad(), \
                            input_hooks(consumers, lambda name, x: stats[name].add(x)):
                        for b, state in enumerate(states):
                            out = call_block(block, state.to(device), move_to(captured.kwargs[index][b], device))
                            outputs.append(out.to(storage))
                            del state, out
                except BaseException:
                    outputs.close()
                    raise
                states.close()
                states = outputs
                reduce_statistics(stats, settings.ranks)  # each rank ran its share of the windows
                on_block(index, block, {part: stats[part].take() for part in PARTS})
            finally:
                block.to(home)
                source.release(index, block)
            bar.update(1)
    finally:
        bar.close()
        states.close()


def measured_sizes(run: PruneRun, source: BlockSource, captured: CapturedInputs, *, progress: bool = True
                   ) -> list[BlockSize]:
    """Every block's kept sizes from the allocation the config resolves to (``"osscar"`` or ``"flap"``)."""
    allocation = run.config.resolved_allocation()
    if allocation not in _ALLOCATIONS:
        raise ValueError(f"no planning pass for allocation {allocation!r}")
    return _ALLOCATIONS[allocation](run, source, captured, progress)


def _floors(run: PruneRun) -> list[tuple[int, int]]:
    return [(floor.attention, floor.mlp) for floor in (part_floors(run.config, g) for g in run.geometries)]


def _flap(run: PruneRun, source: BlockSource, captured: CapturedInputs, progress: bool) -> list[BlockSize]:
    flap = get_method("flap")
    settings = run.settings
    scores: dict[tuple[int, str], torch.Tensor] = {}

    layout = settings.attention_layout

    def on_block(index: int, block: nn.Module, stats: BlockStatistics) -> None:
        consumers = block_consumers(block, run.spec)
        for part in PARTS:
            group = layout.group_size if part == "attention" else 1
            problem = LayerProblem(weight=consumers[part].weight, bias=None, group_size=group, num_keep=0,
                                   statistics=stats[part], solve=settings.mlp)
            structure = standardised_structure_scores(flap.channel_scores(problem).cpu(), group)
            if part == "attention" and layout.partitions > 1:  # query heads: one per KV group, ranked in each
                structure = level_scores(structure, layout.partitions)
            scores[(index, part)] = structure

    dense_pass(run, source, captured, flap.statistics, on_block, progress=progress, description="FLAP scores")
    return flap_sizes(scores, run.geometries, sparsity=run.config.sparsity, target=run.config.sparsity_target,
                      floors=_floors(run), min_block_keep=run.config.min_block_keep, round_to=run.config.round_to)


def _osscar(run: PruneRun, source: BlockSource, captured: CapturedInputs, progress: bool) -> list[BlockSize]:
    sizes = sensitivity_sizes(run, source, captured, progress=progress)
    return search_sizes(run, source, sizes, progress=progress)


_ALLOCATIONS: dict[str, Callable[[PruneRun, BlockSource, CapturedInputs, bool], list[BlockSize]]] = {
    "flap": _flap,
    "osscar": _osscar,
}
