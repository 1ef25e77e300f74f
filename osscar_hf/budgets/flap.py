"""FLAP's own global allocation (An et al., AAAI 2024, "adaptive structure search"): the fluctuation scores of
every layer are standardised within the layer (zero mean, unit standard deviation over its input channels), each
structure gets the mean standardised score of its channels, and all structures of all blocks and both parts are
ranked together; the highest are kept, each costing its parameters (or multiply-adds), until the kept cost reaches
the target."""

from __future__ import annotations

import torch

from .geometry import BlockGeometry
from .sizes import BlockSize

__all__ = ["flap_sizes", "level_scores", "standardised_structure_scores"]


def standardised_structure_scores(channel_scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per structure: the mean of its channels' scores after standardising them over the layer."""
    scores = channel_scores.double()
    std = scores.std() if scores.numel() > 1 else scores.new_tensor(0.0)
    standard = (scores - scores.mean()) / std if float(std) > 0 else torch.zeros_like(scores)
    return standard.reshape(-1, group_size).mean(1)


def level_scores(head_scores: torch.Tensor, partitions: int) -> torch.Tensor:
    """Scores of query-head structures (one query head of every KV group) from per-head scores: the ``j``-th
    structure is every group's ``j``-th best head, scored by their mean (decreasing in ``j``)."""
    per_group = head_scores.double().reshape(partitions, -1)
    return torch.sort(per_group, dim=1, descending=True).values.mean(0)


def flap_sizes(scores: dict[tuple[int, str], torch.Tensor], geometries: list[BlockGeometry], *, sparsity: float,
               target: str, floors: list[tuple[int, int]], min_block_keep: float = 0.0, round_to: int = 1
               ) -> list[BlockSize]:
    """Kept sizes from FLAP's global ranking. ``scores[(block, part)]``: standardised structure scores;
    ``floors[block]``: the fewest (attention, mlp) structures a block keeps (neurons: a multiple of ``round_to``);
    ``min_block_keep``: the fraction of each block's cost it keeps (its best-scored structures, whatever their rank
    among all blocks); ``round_to``: neurons are ranked and kept in runs of that many (their mean score), so every
    count is a multiple of it or the full width."""
    total = sum(g.cost(target, g.attention_structures, g.mlp_structures) for g in geometries)
    fixed = sum(g.cost(target, 0, 0) for g in geometries)
    budget = (1.0 - sparsity) * total - fixed
    entries: list[tuple[float, int, int, str, float, int]] = []  # (-score, block, rank, part, cost, structures)
    kept = {}
    for block, geometry in enumerate(geometries):
        units, bases = geometry.unit_costs(target), geometry.base_costs(target)
        candidates = []
        for part, floor in zip(("attention", "mlp"), floors[block]):
            part_scores = scores[(block, part)]
            order = torch.sort(part_scores, descending=True, stable=True).indices.tolist()
            kept[(block, part)] = floor
            budget -= floor * units[part] + (bases[part] if floor else 0.0)  # the floor is kept whatever its score
            run = round_to if part == "mlp" else 1
            for rank in range(floor, len(order), run):
                members = order[rank:rank + run]
                # The first structure kept also brings the part's base (an attention's key and value heads).
                candidates.append((-float(part_scores[members].mean()), block, rank, part,
                                   units[part] * len(members) + (bases[part] if rank == 0 else 0.0), len(members)))
        candidates.sort(key=lambda e: (e[0], e[2], e[3]))  # each part's structures stay in rank order
        block_cost = geometry.cost(target, *floors[block])
        least = min_block_keep * geometry.cost(target, geometry.attention_structures, geometry.mlp_structures)
        while candidates and block_cost < least - 1e-9:  # the block floor, also whatever the scores
            _, _, _, part, cost, count = candidates.pop(0)
            kept[(block, part)] += count
            block_cost += cost
            budget -= cost
        entries += candidates
    entries.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
    skipped: set[tuple[int, str]] = set()  # a part whose run did not fit keeps none of its later (lower) runs
    for _, block, _, part, cost, count in entries:
        if (block, part) in skipped or cost > budget + 1e-9:
            skipped.add((block, part))
            continue
        budget -= cost
        kept[(block, part)] += count
    return [BlockSize(kept[(b, "attention")], kept[(b, "mlp")]) for b in range(len(geometries))]
