"""Spend a global budget: pick one kept size per (block, part) so that the total cost meets the target and the
summed damage is smallest.

Each (block, part) brings a damage curve: damage at each allowed kept size (0 when dense, non-decreasing as
structures are removed). Removals are taken greedily by damage per unit of cost along each curve's lower convex
hull (the Lagrangian solution of the knapsack, exact when the curves are convex), one structure (or ``round_to``
neurons) at a time, until the removed cost reaches the target; a step that would overshoot the target is left for
single steps that still fit, so the result lands within one step of the smallest kind (a neuron, or ``round_to``
of them) of the target.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

__all__ = ["PartCurve", "allocate", "lower_hull"]


@dataclass
class PartCurve:
    """The damage of one block part at each allowed kept size.

    ``sizes``: allowed kept counts, strictly decreasing, starting at the dense count; ``damage``: the same length,
    ``damage[0] == 0``; ``unit``: cost of one structure; ``base``: cost the part loses with its last structure besides
    that structure's own (an attention's key and value heads when its structures are query heads); ``block``: the
    block index (for the block floor).
    """

    block: int
    part: str
    sizes: list[int]
    damage: list[float]
    unit: float
    base: float = 0.0

    def removed(self, j: int) -> float:
        """Cost removed from the dense part at point ``j``."""
        return (self.sizes[0] - self.sizes[j]) * self.unit + (self.base if self.sizes[j] == 0 < self.sizes[0] else 0.0)


def lower_hull(curve: PartCurve) -> list[int]:
    """The points of ``curve``'s lower convex hull (damage against cost removed), in order from the dense point;
    collinear points are kept, so each hull step is the nearest point of smallest damage per unit of cost."""
    hull: list[int] = []
    for j in range(len(curve.sizes)):
        x2, y2 = curve.removed(j), curve.damage[j]
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            x0, y0 = curve.removed(a), curve.damage[a]
            x1, y1 = curve.removed(b), curve.damage[b]
            if (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0) >= 0:  # b is on or below the chord a -> j
                break
            hull.pop()
        hull.append(j)
    return hull


def _segment(curve: PartCurve, at: int, after: dict[int, int]) -> tuple[float, int] | None:
    """From hull point ``at``, the next hull segment: (damage per unit of cost, end point)."""
    end = after.get(at)
    if end is None:
        return None
    removed = curve.removed(end) - curve.removed(at)
    return (curve.damage[end] - curve.damage[at]) / removed, end


def allocate(curves: list[PartCurve], remove: float, block_floors: dict[int, float] | None = None
             ) -> dict[tuple[int, str], int]:
    """Kept size of every (block, part), removing at least ``remove`` cost in total (and less than one more step of
    the cheapest kind) with as little damage as the greedy hull walk finds. ``block_floors``: per block, the most
    cost its parts may lose together. Raises ``ValueError`` when the curves cannot remove ``remove``."""
    position = [0] * len(curves)
    lost = {c.block: 0.0 for c in curves}
    floors = block_floors or {}

    def step_cost(i: int) -> float | None:
        """Cost of curve i's next single step, or None at its end or its block's floor."""
        curve, at = curves[i], position[i]
        if at + 1 >= len(curve.sizes):
            return None
        cost = curve.removed(at + 1) - curve.removed(at)
        floor = floors.get(curve.block)
        return None if floor is not None and lost[curve.block] + cost > floor + 1e-9 else cost

    def take(i: int, cost: float) -> None:
        position[i] += 1
        lost[curves[i].block] += cost

    # Phase 1: hull segments by damage per unit of cost, as long as a step does not overshoot the target.
    successors = []
    for curve in curves:
        hull = lower_hull(curve)
        successors.append(dict(zip(hull, hull[1:])))
    heap: list[tuple[float, int, int]] = []
    for i, curve in enumerate(curves):
        segment = _segment(curve, 0, successors[i])
        if segment is not None:
            heapq.heappush(heap, (segment[0], i, segment[1]))
    removed = 0.0
    while heap:
        _, i, end = heapq.heappop(heap)
        stopped = False
        while position[i] < end:
            cost = step_cost(i)
            if cost is None or removed + cost > remove:
                stopped = True
                break
            take(i, cost)
            removed += cost
        if not stopped:
            segment = _segment(curves[i], position[i], successors[i])
            if segment is not None:
                heapq.heappush(heap, (segment[0], i, segment[1]))
    # Phase 2: single steps that still fit, by damage per unit; then the smallest step that reaches the target.
    while removed < remove:
        options = [(i, cost) for i in range(len(curves)) if (cost := step_cost(i)) is not None]
        if not options:
            raise ValueError(f"the allowed sizes can remove at most {removed:.6g} of the {remove:.6g} asked for")
        fitting = [(i, cost) for i, cost in options if removed + cost <= remove]
        if fitting:
            i, cost = min(fitting, key=lambda o: (_step_slope(curves[o[0]], position[o[0]]), o[0]))
        else:
            i, cost = min(options, key=lambda o: (o[1], _step_slope(curves[o[0]], position[o[0]]), o[0]))
        take(i, cost)
        removed += cost
    return {(c.block, c.part): c.sizes[position[i]] for i, c in enumerate(curves)}


def _step_slope(curve: PartCurve, at: int) -> float:
    removed = curve.removed(at + 1) - curve.removed(at)
    return (curve.damage[at + 1] - curve.damage[at]) / removed
