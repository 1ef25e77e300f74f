"""Solving on different ranks and sharing the answers, so that every rank holds the same result bit for bit.

The consumers of a block are dealt round-robin to the ranks (:meth:`Ranks.owner`): each rank solves its own, the
ranks agree that none failed, and each answer is broadcast from its owner (its tensors sent as they are, the rest pickled), so
that every rank slices its block with the same kept indices and the same refit weights. A single process solves
everything itself, exactly as without this module.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .agree import step
from .context import Ranks

__all__ = ["broadcast", "gather_rows", "solve_shared"]

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


class _TensorsApart(pickle.Pickler):
    """Pickles an object with its tensors left out (each replaced by its shape and dtype), collected in order."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            self.tensors.append(obj.detach())
            return ("tensor", tuple(obj.shape), str(obj.dtype).removeprefix("torch."))
        return None


class _TensorsFrom(pickle.Unpickler):
    """Unpickles what :class:`_TensorsApart` wrote, each tensor made by ``make(shape, dtype)`` in order."""

    def __init__(self, data: bytes, make: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]) -> None:
        super().__init__(io.BytesIO(data))
        self.make = make

    def persistent_load(self, pid: Any) -> torch.Tensor:
        _, shape, dtype = pid
        return self.make(shape, getattr(torch, dtype))


def broadcast(obj: T, ranks: Ranks, source: int = 0) -> T:
    """``obj`` of rank ``source`` on every rank (returned as is for a single process), its tensors on
    ``ranks.device``. Call it right after the ranks agreed (see :mod:`.agree`). The object is pickled without its
    tensors, which are then broadcast one by one as they are: a refit weight is sent once, in its own dtype, GPU to
    GPU under NCCL."""
    if not ranks.distributed:
        return obj
    box: list[Any] = [None]
    tensors: list[torch.Tensor] = []
    if ranks.rank == source:
        buffer = io.BytesIO()
        pickler = _TensorsApart(buffer)
        pickler.dump(obj)
        box, tensors = [buffer.getvalue()], [t.to(ranks.device).contiguous() for t in pickler.tensors]
    dist.broadcast_object_list(box, src=source, device=ranks.device)
    received: list[torch.Tensor] = []

    def make(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensor = tensors[len(received)] if ranks.rank == source else torch.empty(shape, dtype=dtype,
                                                                                    device=ranks.device)
        dist.broadcast(tensor, src=source)
        received.append(tensor)
        return tensor

    return _TensorsFrom(box[0], make).load()


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


def gather_rows(local: torch.Tensor, counts: Sequence[int], ranks: Ranks) -> torch.Tensor:
    """Every rank's ``local`` (rank ``r``'s with ``counts[r]`` rows, the same other dimensions and dtype on all
    ranks) concatenated along dimension 0 in rank order, on every rank, where ``local`` is; ``local`` itself for a
    single process. Each rank's rows are padded to the largest count for the collective."""
    if not ranks.distributed:
        return local
    if local.shape[0] != counts[ranks.rank]:
        raise ValueError(f"rank {ranks.rank} holds {local.shape[0]} rows where its count is {counts[ranks.rank]}")
    padded = local.new_zeros((max(counts), *local.shape[1:]), device=ranks.device)
    padded[:local.shape[0]] = local.to(ranks.device)
    parts = [torch.empty_like(padded) for _ in range(ranks.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)]).to(local.device)
