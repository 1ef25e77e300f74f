"""A CNN's global budget (``OsscarConfig(sparsity=...)``): every residual block's kept inner widths.

The cost is that of :mod:`.channel_geometry` (parameters or multiply-adds of the residual blocks); the goal keeps
``(1 - sparsity)`` of its dense total.

* ``allocation="uniform"``: one kept fraction ``f`` for every inner width (``round(f * width)``, rounded to
  ``round_to``, at least one channel), the largest ``f`` whose total meets the goal.
* global: the measured damage curves of every (block, problem) are spent by :func:`osscar_hf.budgets.allocate`
  on the cost linearised at the current widths (a bottleneck's conv2 costs ``k_a * k_b``, so a channel's cost depends
  on the other width), re-linearised at its answer a few times, and then settled exactly: single channels (or runs
  of ``round_to``) removed by least damage per cost while the total is over the goal, and added back by most damage
  saved per cost while one still fits. The result never keeps more than the goal, and no single channel that could
  be added back would fit: it falls short of the goal by less than one channel's cost.

``min_part_keep`` (a fraction of every inner width, rounded up, at least one channel) and ``min_block_keep`` (a
fraction of every block's cost) bound a global allocation; :func:`check_channel_budget` refuses a goal they make
impossible from the shapes alone, walking the same steps with zero damage.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from ..errors import OsscarConfigError
from .allocate import PartCurve, allocate
from .channel_geometry import ChannelGeometry
from .plan import allowed_sizes, part_floor, round_neurons, uses_global_allocation

__all__ = ["channel_floors", "channel_goal", "check_channel_budget", "first_prune_widths", "global_channel_widths",
           "uniform_channel_widths"]

Widths = list[tuple[int, ...]]
Damage = dict[tuple[int, int], dict[int, float]]
LINEARISATIONS = 4  # allocations on the cost linearised at the previous answer, at most


def channel_goal(config: Any, geometries: list[ChannelGeometry]) -> float:
    """The most cost the pruned blocks may keep."""
    return (1.0 - config.sparsity) * sum(g.dense for g in geometries)


def _total(geometries: list[ChannelGeometry], widths: Widths) -> float:
    return sum(g.cost(k) for g, k in zip(geometries, widths))


def _fraction_widths(geometries: list[ChannelGeometry], fraction: float, round_to: int) -> Widths:
    return [tuple(round_neurons(max(1, round(fraction * w)), w, round_to) for w in g.widths) for g in geometries]


def uniform_channel_widths(config: Any, geometries: list[ChannelGeometry]) -> Widths:
    """The same kept fraction of every inner width: the largest that meets the goal (bisection; the total is
    non-decreasing in the fraction)."""
    goal = channel_goal(config, geometries)
    if _total(geometries, _fraction_widths(geometries, 0.0, config.round_to)) > goal:
        raise OsscarConfigError(_impossible(config, geometries, "one channel of every inner width"))
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if _total(geometries, _fraction_widths(geometries, middle, config.round_to)) <= goal:
            low = middle
        else:
            high = middle
    return _fraction_widths(geometries, low, config.round_to)


def channel_floors(config: Any, geometry: ChannelGeometry) -> tuple[int, ...]:
    """The fewest channels a global allocation leaves of each inner width (``min_part_keep``, at least one)."""
    return tuple(max(min(w, config.round_to), part_floor(w, config.min_part_keep, config.round_to))
                 for w in geometry.widths)


def _sizes(config: Any, geometry: ChannelGeometry) -> list[list[int]]:
    floors = channel_floors(config, geometry)
    return [allowed_sizes(w, floor, config.round_to) for w, floor in zip(geometry.widths, floors)]


def first_prune_widths(config: Any, geometries: list[ChannelGeometry]) -> Widths:
    """The uniform widths of the goal raised to the floors: the model the allocation measures its damage in."""
    uniform = uniform_channel_widths(config, geometries)
    return [tuple(max(k, f) for k, f in zip(kept, channel_floors(config, g))) for kept, g in zip(uniform, geometries)]


def global_channel_widths(config: Any, geometries: list[ChannelGeometry], damage: Damage) -> Widths:
    """Spend the budget on ``damage[(block, problem)]`` (kept count -> damage, over every allowed size); raises
    ``ValueError`` when the floors cannot meet the goal."""
    goal = channel_goal(config, geometries)
    widths = first_prune_widths(config, geometries)
    for _ in range(LINEARISATIONS):
        curves, remove, block_floors = _linearised(config, geometries, damage, widths)
        try:
            kept = allocate(curves, remove, block_floors)
        except ValueError:  # the linearised floors are tighter than the exact ones near the floors: settle exactly
            break
        new = [tuple(kept[(b, str(p))] for p in range(len(g.widths))) for b, g in enumerate(geometries)]
        if new == widths:
            break
        widths = new
    return _settle(config, geometries, damage, widths, goal)


def _linearised(config: Any, geometries: list[ChannelGeometry], damage: Damage, at: Widths
                ) -> tuple[list[PartCurve], float, dict[int, float]]:
    """PartCurves with every channel's cost taken at ``at``, the cost to remove, and the blocks' floors, so that
    what :func:`allocate` removes meets the goal on the cost linearised at ``at``."""
    curves, remove, floors = [], -channel_goal(config, geometries), {}
    for b, (g, kept) in enumerate(zip(geometries, at)):
        units = [g.unit(kept, p) for p in range(len(kept))]
        linear_dense = g.cost(kept) + sum(u * (w - k) for u, w, k in zip(units, g.widths, kept))
        remove += linear_dense
        floors[b] = max(0.0, linear_dense - config.min_block_keep * g.dense)
        for p, sizes in enumerate(_sizes(config, g)):
            curves.append(PartCurve(b, str(p), sizes, [damage[(b, p)][k] for k in sizes], units[p]))
    return curves, remove, floors


def _settle(config: Any, geometries: list[ChannelGeometry], damage: Damage, widths: Widths, goal: float) -> Widths:
    """Exact costs: blocks raised back to their floors (the linearised cost may have let one below), then single
    steps removed while over the goal, then added back while they still fit."""
    widths = [list(k) for k in widths]
    sizes = [_sizes(config, g) for g in geometries]
    for b, g in enumerate(geometries):
        while g.cost(widths[b]) < config.min_block_keep * g.dense - 1e-9:
            step = _best_step([g], {(0, p): damage[(b, p)] for p in range(len(g.widths))}, [sizes[b]], [widths[b]],
                              down=False, fits=lambda _b, _kept: True)
            if step is None:
                break
            _apply([g], [widths[b]], 0, step[1], step[2])
    total = _total(geometries, [tuple(k) for k in widths])
    while total > goal + 1e-9:
        step = _best_step(geometries, damage, sizes, widths, down=True,
                          fits=lambda b, kept: geometries[b].cost(kept) >= config.min_block_keep
                          * geometries[b].dense - 1e-9)
        if step is None:
            step = _cheapest_block(config, geometries, sizes, widths)
            if step is None:
                raise ValueError(f"the allowed widths can keep no less than {total:.6g}, over the goal {goal:.6g}")
            b, kept = step
            before = geometries[b].cost(widths[b])
            widths[b] = list(kept)
            total += geometries[b].cost(kept) - before
            continue
        total += _apply(geometries, widths, *step)
    while True:
        step = _best_step(geometries, damage, sizes, widths, down=False,
                          fits=lambda b, kept: total - geometries[b].cost(widths[b]) + geometries[b].cost(kept)
                          <= goal + 1e-9)
        if step is None:
            return [tuple(k) for k in widths]
        total += _apply(geometries, widths, *step)


def _cheapest_block(config: Any, geometries: list[ChannelGeometry], sizes: list[list[list[int]]],
                    widths: list[list[int]]) -> tuple[int, tuple[int, ...]] | None:
    """When no single step fits the block floors: the block whose least-cost widths within its floors save the
    most, and those widths (None when every block is at its least cost already)."""
    best, saving = None, 1e-9
    for b, g in enumerate(geometries):
        kept = _least_widths(g, sizes[b], config.min_block_keep * g.dense)
        if kept is not None and g.cost(widths[b]) - g.cost(kept) > saving:
            best, saving = (b, kept), g.cost(widths[b]) - g.cost(kept)
    return best


def _least_widths(g: ChannelGeometry, sizes: list[list[int]], floor: float) -> tuple[int, ...] | None:
    """The allowed widths of least cost at or above ``floor`` (the last width by bisection: the cost grows with it)."""
    best: tuple[int, ...] | None = None
    for head in itertools.product(*sizes[:-1]):
        last = sizes[-1][::-1]  # increasing
        low, high = 0, len(last)
        while low < high:
            middle = (low + high) // 2
            if g.cost((*head, last[middle])) >= floor - 1e-9:
                high = middle
            else:
                low = middle + 1
        if low < len(last):
            kept = (*head, last[low])
            if best is None or g.cost(kept) < g.cost(best):
                best = kept
    return best


def _neighbour(sizes: list[int], kept: int, down: bool) -> int | None:
    at = sizes.index(kept)
    j = at + 1 if down else at - 1
    return sizes[j] if 0 <= j < len(sizes) else None


def _best_step(geometries: list[ChannelGeometry], damage: Damage, sizes: list[list[list[int]]],
               widths: list[list[int]], *, down: bool, fits: Callable[[int, list[int]], bool]
               ) -> tuple[int, int, int] | None:
    """(block, problem, new count) of the single step of least damage added (``down``) or most damage saved per
    unit of cost, among those ``fits`` accepts."""
    best, best_key = None, None
    for b, g in enumerate(geometries):
        for p, allowed in enumerate(sizes[b]):
            new = _neighbour(allowed, widths[b][p], down)
            if new is None:
                continue
            kept = list(widths[b])
            kept[p] = new
            if not fits(b, kept):
                continue
            cost = abs(g.cost(widths[b]) - g.cost(kept))
            change = abs(damage[(b, p)][new] - damage[(b, p)][widths[b][p]]) / max(cost, 1e-30)
            key = (change if down else -change, b, p)
            if best_key is None or key < best_key:
                best, best_key = (b, p, new), key
    return best


def _apply(geometries: list[ChannelGeometry], widths: list[list[int]], b: int, p: int, new: int) -> float:
    before = geometries[b].cost(widths[b])
    widths[b][p] = new
    return geometries[b].cost(widths[b]) - before


def check_channel_budget(config: Any, geometries: list[ChannelGeometry]) -> None:
    """Refuse a ``sparsity`` the floors make impossible (``OsscarConfigError`` naming the values), from shapes alone."""
    if not uses_global_allocation(config):
        uniform_channel_widths(config, geometries)
        return
    zero = {(b, p): {k: 0.0 for k in sizes} for b, g in enumerate(geometries)
            for p, sizes in enumerate(_sizes(config, g))}
    try:
        global_channel_widths(config, geometries, zero)
    except ValueError:
        raise OsscarConfigError(_impossible(config, geometries, f"min_part_keep={config.min_part_keep} and "
                                                                f"min_block_keep={config.min_block_keep}")) from None


def _impossible(config: Any, geometries: list[ChannelGeometry], floors: str) -> str:
    dense = sum(g.dense for g in geometries)
    least = sum(max(g.cost(channel_floors(config, g)), config.min_block_keep * g.dense) for g in geometries) \
        if uses_global_allocation(config) else _total(geometries, _fraction_widths(geometries, 0.0, config.round_to))
    return (f"sparsity={config.sparsity} asks to keep {(1 - config.sparsity) * dense:.4g} of the residual blocks' "
            f"{dense:.4g} {config.sparsity_target}, but {floors} keep at least about {least:.4g} "
            f"({least / dense:.1%}): lower the sparsity" + (" or the floors" if uses_global_allocation(config) else ""))
