"""The pruning pass of OSSCAR's global allocation on the Gram matrices its planning accumulated.

The planning's uniform first prune (:mod:`.sensitivity`) runs every block's consumers on the calibration windows
carried through the uniformly pruned blocks, and accumulates their Grams there. With
``OsscarConfig(reuse_planning_grams=True)`` (the default; :meth:`OsscarConfig.keeps_planning_grams` says when it
applies) those Grams are kept (:meth:`BlockSource.keep_statistics`),
and the pruning pass solves each block at its planned sizes on them: no second pass over the calibration data.
Measured on SmolLM2 (``docs/budgets.md``), fitting every block on the uniformly pruned model's stream gives a
better model than a fresh sequential pass at the planned sizes, in about half the pruning pass's time.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..activations import ActivationStore
from ..arch import ArchSpec
from ..capture import CapturedInputs
from ..methods import Selection
from .block import BlockStream, solve_and_slice
from .run import BlockSource
from .settings import LoopSettings
from .statistics import statistics_from_tensors

__all__ = ["KeptStatisticsStream", "solve_on_kept"]


def solve_on_kept(source: BlockSource, block: nn.Module, index: int, spec: ArchSpec, settings: LoopSettings
                  ) -> dict[str, tuple[Selection, float]]:
    """Select and slice block ``index`` (on ``settings.device``) at its size in ``settings`` on the statistics
    ``source`` kept for it (which stay kept); return each pruned part's selection and its seconds."""
    tensors = source.statistics(index)
    if tensors is None:
        raise RuntimeError(f"no statistics were kept for block {index}")
    stats: dict[str, Any] = statistics_from_tensors(tensors, settings.device)
    return solve_and_slice(block, index, spec, settings, stats)


class KeptStatisticsStream(BlockStream):
    """A :class:`BlockStream` whose blocks are solved on the statistics ``source`` kept for them: no calibration
    activations, nothing to propagate or replay."""

    def __init__(self, spec: ArchSpec, captured: CapturedInputs, settings: LoopSettings, *,
                 source: BlockSource) -> None:
        self.spec, self.settings, self.sink, self.source = spec, settings, None, source
        self.kwargs = captured.kwargs
        self._owns_space = False
        self.states = self.dense_states = self._next_states = self._next_dense = None
        hidden, captured.hidden = captured.hidden, []
        if isinstance(hidden, ActivationStore):  # block 0's inputs: not needed
            hidden.close()

    def _select_and_slice(self, index: int, block: nn.Module) -> dict[str, tuple[Selection, float]]:
        return solve_on_kept(self.source, block, index, self.spec, self.settings)

    def replay(self, index: int, block: nn.Module, *, pruned: bool) -> None:
        """Nothing to move past: the blocks' statistics do not depend on the blocks before."""

    def finish_replay(self) -> None:
        """See :meth:`replay`."""
