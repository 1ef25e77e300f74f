"""Summing the statistics every rank accumulated on its share of the calibration windows.

A Gram (and a dense-target cross-Gram) is kept as a running mean over the rank's tokens (:mod:`osscar_hf.solver.gram`):
it is scaled to a sum, all-reduced in place and divided by the global token count, so that every rank holds the
Gram of all the windows. First and second moments (sums already) and token counts are summed as they are; a
mixture of experts' statistics are reduced expert by expert. Nothing bigger than one statistic is ever copied.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .context import Ranks

if TYPE_CHECKING:  # pragma: no cover - the pipeline imports this module
    from ..pipeline.statistics import ExpertStatistics, InputStatistics

__all__ = ["reduce_statistics", "sum_in_place"]

logger = logging.getLogger(__name__)


def _covering(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor over ``t``'s storage: ``t`` itself, or the whole padded buffer of a row-major matrix
    with a padded row stride (:func:`osscar_hf.solver.new_gram`), its padding zeroed."""
    if t.is_contiguous():
        return t
    if t.dim() != 2 or t.stride(1) != 1 or t.storage_offset() != 0 or \
            t.untyped_storage().nbytes() < t.shape[0] * t.stride(0) * t.element_size():
        raise ValueError(f"cannot all-reduce a statistic of shape {tuple(t.shape)} and strides {t.stride()} in place")
    rows, cols, stride = t.shape[0], t.shape[1], t.stride(0)
    full = t.as_strided((rows, stride), (stride, 1))
    full[:, cols:].zero_()
    return full


def sum_in_place(t: torch.Tensor, ranks: Ranks) -> int:
    """All-reduce ``t`` as a sum, in place; the bytes sent into the reduction."""
    full = _covering(t)
    if full.device == ranks.device:
        dist.all_reduce(full)
    else:  # statistics on the CPU under NCCL (or on a GPU under gloo)
        moved = full.to(ranks.device)
        dist.all_reduce(moved)
        full.copy_(moved)
    return full.numel() * full.element_size()


def _reduce_mean(mean: torch.Tensor, count: int, total: int, ranks: Ranks) -> int:
    """A running mean over ``count`` of ``total`` tokens made the mean over all of them, on every rank."""
    mean.mul_(count)
    sent = sum_in_place(mean, ranks)
    if total:
        mean.div_(total)
    return sent


def _reduce_one(stats: InputStatistics, ranks: Ranks) -> int:
    counts = torch.tensor([stats.count, stats.count_cross, stats.tokens], dtype=torch.int64, device=ranks.device)
    dist.all_reduce(counts)
    count, count_cross, tokens = (int(v) for v in counts.tolist())
    sent = counts.numel() * counts.element_size()
    if stats.gram is not None:
        sent += _reduce_mean(stats.gram, stats.count, count, ranks)
    if stats.cross_gram is not None:
        sent += _reduce_mean(stats.cross_gram, stats.count_cross, count_cross, ranks)
    for moment in (stats.sum, stats.sum_square):
        if moment is not None:
            sent += sum_in_place(moment, ranks)
    stats.count, stats.count_cross, stats.tokens = count, count_cross, tokens
    return sent


def _flat(stats: Iterable[InputStatistics | ExpertStatistics]) -> list[InputStatistics]:
    """Every :class:`InputStatistics`, a mixture of experts' one per expert."""
    out: list[InputStatistics] = []
    for s in stats:
        out.extend(getattr(s, "experts", None) or [s])
    return out


def reduce_statistics(stats: dict[str, InputStatistics | ExpertStatistics], ranks: Ranks) -> int:
    """Make every rank's ``stats`` those of all ranks' windows together (in place, in ``stats``' order, which must
    be the same on every rank); return the bytes this rank sent into the reductions (0 for a single process)."""
    if not ranks.distributed:
        return 0
    sent = sum(_reduce_one(s, ranks) for s in _flat(stats.values()))
    logger.debug("rank %d: all-reduced %d bytes of statistics (%s)", ranks.rank, sent, ", ".join(stats))
    return sent

