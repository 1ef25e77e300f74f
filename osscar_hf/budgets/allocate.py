"""Spend a global budget: pick one kept size per (block, part) so that the total cost meets the target and the
summed damage is smallest.

Each (block, part) brings a damage curve: damage at each allowed kept size (0 when dense, non-decreasing as
structures are removed). Removals are taken greedily by damage per unit of cost along each curve's lower convex
hull (the Lagrangian solution of the knapsack, exact when the curves are convex), one structure (or ``round_to``
neurons) at a time, until the removed cost reaches the target; neurons are then given back where that costs
least, so the result lands within one neuron (or rounding unit) of the target.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

__all__ = ["PartCurve", "allocate"]


@dataclass
class PartCurve:
    """The damage of one block part at each allowed kept size.

    ``sizes``: allowed kept counts, strictly decreasing, starting at the dense count; ``damage``: the same length,
    ``damage[0] == 0``; ``unit``: cost of one structure; ``block``: the block index (for the block floor).
    """

    block: int
    part: str
    sizes: list[int]
    damage: list[float]
    unit: float


def _best_segment(curve: PartCurve, at: int) -> tuple[float, int] | None:
    """From point ``at``, the hull segment with the smallest damage per unit of cost: (slope, end point)."""
    best = None
    for j in range(at + 1, len(curve.sizes)):
        removed = (curve.sizes[at] - curve.sizes[j]) * curve.unit
        slope = (curve.damage[j] - curve.damage[at]) / removed
        if best is None or slope < best[0] - 1e-15 * abs(best[0]):
            best = (slope, j)
    return best


def allocate(curves: list[PartCurve], remove: float, block_floors: dict[int, float] | None = None
             ) -> dict[tuple[int, str], int]:
    """Kept size of every (block, part), removing at least ``remove`` cost in total and as little damage as the
    greedy hull walk finds. ``block_floors``: per block, the most cost its parts may lose together."""
    position = {id(c): 0 for c in curves}
    lost = {c.block: 0.0 for c in curves}
    floors = block_floors or {}
    heap: list[tuple[float, int, int]] = []
    by_id = {id(c): c for c in curves}
    order = {id(c): i for i, c in enumerate(curves)}  # ties: the first curve, for reproducible results

    def push(curve: PartCurve) -> None:
        segment = _best_segment(curve, position[id(curve)])
        if segment is not None:
            heapq.heappush(heap, (segment[0], order[id(curve)], segment[1]))

    for curve in curves:
        push(curve)
    removed = 0.0
    while removed < remove and heap:
        _, index, end = heapq.heappop(heap)
        curve = curves[index]
        blocked = False
        # Walk the segment one allowed size at a time: stop at the target or at the block's floor.
        for j in range(position[id(curve)] + 1, end + 1):
            step = (curve.sizes[j - 1] - curve.sizes[j]) * curve.unit
            floor = floors.get(curve.block)
            if floor is not None and lost[curve.block] + step > floor + 1e-9:
                blocked = True
                break
            position[id(curve)] = j
            lost[curve.block] += step
            removed += step
            if removed >= remove:
                break
        if not blocked:
            push(curve)
    _give_back(curves, position, removed - remove)
    return {(c.block, c.part): c.sizes[position[id(c)]] for c in by_id.values()}


def _give_back(curves: list[PartCurve], position: dict[int, int], excess: float) -> None:
    """Undo removals (the most damaging per unit of cost first) while the excess over the target allows a whole one."""
    while excess > 0:
        best = None
        for curve in curves:
            at = position[id(curve)]
            if at == 0:
                continue
            step = (curve.sizes[at - 1] - curve.sizes[at]) * curve.unit
            if step > excess + 1e-9:
                continue
            saving = (curve.damage[at] - curve.damage[at - 1]) / step
            if best is None or saving > best[0]:
                best = (saving, curve, step)
        if best is None:
            return
        _, curve, step = best
        position[id(curve)] -= 1
        excess -= step
