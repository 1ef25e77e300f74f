"""Equal counts per partition: the structures of a layer split into ``partitions`` equal, contiguous partitions
(structure ``j`` in partition ``j // (m / partitions)``), and every selection keeps the same number from each.

Query-head pruning inside KV groups is the case it exists for: the structures are query heads, a partition is one
KV group's heads, and the model only runs when every KV group keeps as many query heads as the others. The
constraint is part of the selection (stage A never removes a structure from a partition that is down to its
share, stage B swaps a structure only for one of its own partition), not a trim of a free selection afterwards.
"""

from __future__ import annotations

import torch

__all__ = ["check_partitions", "partition_ids", "pick_within_quota"]


def check_partitions(num_groups: int, num_keep: int, partitions: int) -> None:
    """ValueError unless ``partitions`` divides ``num_groups`` and ``num_keep`` (each partition keeps the same
    number)."""
    if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1 or num_groups % partitions:
        raise ValueError(f"partitions must be a positive divisor of the number of groups m = {num_groups}, "
                         f"got {partitions!r}")
    if num_keep % partitions:
        raise ValueError(f"num_keep = {num_keep} must be a multiple of partitions = {partitions}: every one of the "
                         f"{partitions} partitions keeps the same number of its {num_groups // partitions} groups")


def partition_ids(num_groups: int, partitions: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The partition of each of ``num_groups`` groups (int64, ``(num_groups,)``)."""
    return torch.arange(num_groups, dtype=torch.int64, device=device) // (num_groups // partitions)


def pick_within_quota(values: torch.Tensor, ids: torch.Tensor, quota: torch.Tensor, count: int, *,
                      largest: bool) -> torch.Tensor:
    """Indices of ``count`` entries of ``values`` taken in order (smallest first, or largest with ``largest``; ties
    to the lower index) while no partition (``ids``) gives more than its ``quota`` (int64 per partition); fewer
    when the quotas run out first."""
    order = torch.sort(values, descending=largest, stable=True).indices
    sorted_ids = ids[order]
    onehot = torch.nn.functional.one_hot(sorted_ids, quota.numel())
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # how many of its partition come before it in the order
    return order[rank < quota.to(rank.device)[sorted_ids]][:count]
