"""Solving on different ranks and sharing the answers, so that every rank holds the same result bit for bit.

The consumers of a block are dealt round-robin to the ranks (:meth:`Ranks.owner`): each rank solves its own, the
ranks agree that none failed, and each answer is broadcast from its owner (pickled, its tensors on the CPU), so
that every rank slices its block with the same kept indices and the same refit weights. A single process solves
everything itself, exactly as without this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .agree import step
from .context import Ranks

__all__ = ["broadcast", "solve_shared"]

T = TypeVar("T")
K = TypeVar("K")


def _moved(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor inside (dataclasses, tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _moved(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (tuple, list)):
        return type(obj)(_moved(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _moved(v, device) for k, v in obj.items()}
    return obj


def broadcast(obj: T, ranks: Ranks, source: int = 0) -> T:
    """``obj`` of rank ``source`` on every rank (returned as is for a single process). Call it right after the
    ranks agreed (see :mod:`.agree`); tensors inside come back on the CPU."""
    if not ranks.distributed:
        return obj
    box = [_moved(obj, "cpu") if ranks.rank == source else None]
    dist.broadcast_object_list(box, src=source, device=ranks.device)
    return box[0]


def solve_shared(items: Sequence[K], solve: Callable[[K], T], ranks: Ranks, device: torch.device) -> dict[K, T]:
    """``{item: solve(item)}``, each item solved by its owner rank only and shared with the others (tensors on
    ``device``); all ranks stop with the error when one fails."""
    if not ranks.distributed:
        return {item: solve(item) for item in items}
    mine: dict[K, T] = {}
    with step(ranks):
        for i, item in enumerate(items):
            if ranks.owner(i) == ranks.rank:
                mine[item] = solve(item)
    return {item: _moved(broadcast(mine.get(item), ranks, ranks.owner(i)), device) for i, item in enumerate(items)}
