"""One pruning run's state (:class:`PruneRun`) and where its blocks' weights live (:class:`BlockSource`, with
:class:`InMemoryBlocks` for a model in memory; :mod:`osscar_hf.streaming` has the shard-backed one).

Shared by the orchestration (:mod:`.orchestrate`) and the planning passes (:mod:`.measure`, :mod:`.sensitivity`),
which the orchestration calls: they live here so that none of them imports another in a circle.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn

from ..arch import ArchSpec, get_submodule
from ..budgets import BlockGeometry
from ..capture import CapturedInputs
from ..config import OsscarConfig
from ..report import BlockReport
from .settings import LoopSettings

__all__ = ["BlockSource", "InMemoryBlocks", "PruneRun", "scratch_copy"]


class BlockSource(Protocol):
    """Where the orchestration finds each block's weights and where a pruned block goes."""

    def load(self, index: int, block: nn.Module) -> None:
        """Give ``block`` (block ``index`` of the model) its dense weights, if it does not hold them."""

    def release(self, index: int, block: nn.Module) -> None:
        """A read-only pass over ``block`` is done: drop what :meth:`load` brought in."""

    def store(self, index: int, block: nn.Module, report: BlockReport) -> None:
        """``block`` has been pruned (``report``): keep it, and drop what :meth:`load` brought in."""

    def keep_scratch(self, index: int, module: nn.Module) -> None:
        """Keep ``module``, a pruned copy of block ``index`` made while planning, until :meth:`scratch` asks."""

    def scratch(self, index: int) -> nn.Module:
        """The copy :meth:`keep_scratch` kept, with its weights (released again by :meth:`drop_scratch`)."""

    def release_scratch(self, index: int, module: nn.Module) -> None:
        """Done with the copy :meth:`scratch` gave for now; it stays kept (streamed: its weights leave memory)."""

    def drop_scratch(self, index: int, module: nn.Module) -> None:
        """The planning pass is done with the copy of block ``index``: free it."""

    def keep_statistics(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Keep what the planning accumulated for block ``index`` (its consumers' Grams, as named tensors) for the
        pruning pass; dropped when the block is stored."""

    def statistics(self, index: int) -> dict[str, torch.Tensor] | None:
        """What :meth:`keep_statistics` kept for block ``index``, or None."""

    def has_statistics(self, index: int) -> bool:
        """Whether :meth:`keep_statistics` kept something for block ``index`` (without reading it)."""


def scratch_copy(source: BlockSource, index: int, block: nn.Module) -> nn.Module:
    """A copy of block ``index`` with its dense weights, which the caller may prune; the block itself is left as it
    was (in memory: untouched; streamed: released again)."""
    source.load(index, block)
    try:
        return copy.deepcopy(block)
    finally:
        source.release(index, block)


class InMemoryBlocks:
    """The blocks of a model held in memory: nothing to load, release or store; scratch copies stay in memory."""

    def __init__(self) -> None:
        self._scratch: dict[int, nn.Module] = {}
        self._statistics: dict[int, dict[str, torch.Tensor]] = {}

    def load(self, index: int, block: nn.Module) -> None:
        pass

    def release(self, index: int, block: nn.Module) -> None:
        pass

    def store(self, index: int, block: nn.Module, report: BlockReport) -> None:
        self._statistics.pop(index, None)

    def keep_scratch(self, index: int, module: nn.Module) -> None:
        self._scratch[index] = module

    def scratch(self, index: int) -> nn.Module:
        return self._scratch[index]

    def release_scratch(self, index: int, module: nn.Module) -> None:
        pass

    def drop_scratch(self, index: int, module: nn.Module) -> None:
        self._scratch.pop(index, None)

    def keep_statistics(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self._statistics[index] = tensors

    def statistics(self, index: int) -> dict[str, torch.Tensor] | None:
        return self._statistics.get(index)

    def has_statistics(self, index: int) -> bool:
        return index in self._statistics


@dataclass
class PruneRun:
    """One pruning run: its config, the model (or its skeleton), settings, the blocks' costs and the data."""

    config: OsscarConfig
    model: nn.Module
    spec: ArchSpec
    settings: LoopSettings
    geometries: list[BlockGeometry]
    windows: torch.Tensor | None
    params_before: int
    held_out: torch.Tensor | None = None  # windows a measured plan measures on (none of them is a calibration one)
    held_out_inputs: CapturedInputs | None = None  # block 0's inputs for them (see capture)
    started: float = field(default_factory=time.perf_counter)
    plan_seconds: float = 0.0
    search_summary: dict[str, Any] | None = None  # what the allocation search did (see .search), when it ran

    @property
    def blocks(self) -> nn.ModuleList:
        return get_submodule(self.model, self.spec.blocks)

    @property
    def needs_calibration(self) -> bool:
        """Whether anything in the run reads calibration data (a method with statistics, or a measured plan)."""
        return bool(self.settings.method.statistics) or not self.settings.sizes
