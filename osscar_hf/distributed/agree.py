"""Stopping every rank when one fails, in bounded time.

A collective waits for every rank; a rank that raised would leave the others waiting. So the ranks agree, before
every exchange of data, that none of them failed (:func:`step`): a one-integer all-reduce. A rank that fails
anywhere, inside a step or between steps (under :func:`guard`, which spans the whole run), joins the next agreement
with its error, which the others then raise as :class:`~osscar_hf.errors.RankFailedError` naming it; the failed
rank raises its own error. An error is announced once, however many steps and guards it passes through.

The invariant that makes this work: every collective of a run is an agreement or comes right after one that all
ranks passed (nothing that can fail runs between the two).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..errors import RankFailedError
from .context import Ranks

__all__ = ["agree", "guard", "step"]

logger = logging.getLogger(__name__)

_ANNOUNCED = "_osscar_announced_to_ranks"


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def agree(ranks: Ranks, error: BaseException | None = None) -> None:
    """Every rank's agreement that none failed; raise :class:`RankFailedError` on the ranks that did not fail
    when one did (``error``: this rank's own failure, then marked as announced; the caller raises it)."""
    if not ranks.distributed:
        return
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=ranks.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()) == 0:
        return
    messages: list[str | None] = [None] * ranks.world_size
    dist.all_gather_object(messages, None if error is None else _describe(error))
    if error is not None:
        setattr(error, _ANNOUNCED, True)
        return
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    raise RankFailedError("; ".join(f"rank {r} failed: {m}" for r, m in failed)
                          + f" (rank {ranks.rank} stopped too)")


def _announce(ranks: Ranks, error: BaseException) -> None:
    """Tell the other ranks about ``error`` (once); a broken group (a rank gone) is logged, not raised."""
    if not ranks.distributed or getattr(error, _ANNOUNCED, False) or isinstance(error, RankFailedError):
        return
    setattr(error, _ANNOUNCED, True)
    try:
        agree(ranks, error)
    except Exception as exc:  # noqa: BLE001 - the error to raise is the rank's own
        logger.error("rank %d could not tell the other ranks that it failed: %s", ranks.rank, exc)


@contextmanager
def step(ranks: Ranks) -> Iterator[None]:
    """Run the body on every rank, then agree that none failed (a no-op for a single process)."""
    try:
        yield
    except BaseException as exc:
        _announce(ranks, exc)
        raise
    agree(ranks)


@contextmanager
def guard(ranks: Ranks) -> Iterator[None]:
    """Span a whole run: an error raised between steps is announced to the ranks waiting at their next step, and
    a rank that finishes waits until every rank has (a no-op for a single process)."""
    with step(ranks):
        yield
