"""Every block's kept sizes, from an OsscarConfig: uniform fractions, explicit sizes, or a global budget.

* ``attention_sparsity`` / ``mlp_sparsity`` (the paper's setting): every block removes those fractions.
* ``block_sizes``: the caller's own allocation, used as given.
* ``sparsity`` with ``allocation="uniform"``: every block removes the same fraction of its attention structures
  (``keep_count(m, sparsity)``) and the same number of neurons, chosen so that the decoder blocks' total cost
  (``sparsity_target``: parameters or multiply-adds per token) lands as close to the target as uniform sizes can.
* ``sparsity`` with a global allocation: the sizes come from measurements on calibration data
  (:mod:`osscar_hf.pipeline.measure`): OSSCAR's damage curves spent by :func:`global_sizes` (the allocator,
  :func:`osscar_hf.budgets.allocate.allocate`), or FLAP's ranking (:func:`osscar_hf.budgets.flap.flap_sizes`).

``round_to`` makes every kept neuron count a multiple of it (or the full width); ``min_part_keep`` and
``min_block_keep`` bound how far a global allocation may cut one part or one block. Everything a plan needs is
known from the model's shapes, so :func:`check_budget` refuses an impossible one before any data is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..config import keep_count
from ..errors import OsscarConfigError
from .allocate import PartCurve, allocate
from .geometry import BlockGeometry
from .sizes import BlockSize

__all__ = [
    "allowed_sizes", "check_budget", "explicit_sizes", "global_sizes", "part_floor", "part_floors", "plan_fixed_sizes",
    "round_neurons", "uniform_budget_sizes", "uses_global_allocation",
]


def uses_global_allocation(config: Any) -> bool:
    """Whether the sizes come from measured damage curves (a global ``sparsity`` not spent uniformly)."""
    return config.sparsity is not None and config.resolved_allocation() != "uniform"


def round_neurons(kept: int, full: int, round_to: int) -> int:
    """``kept`` rounded to the nearest allowed count: a multiple of ``round_to`` (halves up) or ``full`` itself, never
    above ``full``, and never 0 for a count that was not (an MLP is only removed whole when asked)."""
    if round_to <= 1 or kept >= full:
        return min(kept, full)
    rounded = max(int(math.floor(kept / round_to + 0.5)), 1 if kept > 0 else 0) * round_to
    return full if rounded >= full or full - kept < abs(kept - rounded) else rounded


def part_floor(structures: int, fraction: float, round_to: int = 1) -> int:
    """The fewest structures a part may keep under ``min_part_keep=fraction`` (rounded up, then up to a multiple
    of ``round_to``)."""
    floor = math.ceil(structures * fraction - 1e-9)
    if round_to > 1 and floor % round_to:
        floor = min(structures, (floor // round_to + 1) * round_to)
    return floor


def allowed_sizes(structures: int, floor: int, round_to: int = 1) -> list[int]:
    """Kept counts a global allocation may choose, from ``structures`` (dense) down to ``floor``."""
    sizes = [structures]
    step = max(1, round_to)
    top = (structures - 1) // step * step if step > 1 else structures - 1
    sizes += [k for k in range(top, floor - 1, -step) if k < structures]
    return sizes


def explicit_sizes(config: Any, geometries: list[BlockGeometry]) -> list[BlockSize]:
    """``config.block_sizes`` checked against the model's blocks and ``round_to``."""
    given = config.block_sizes
    if len(given) != len(geometries):
        raise OsscarConfigError(
            f"block_sizes has {len(given)} entries but the model has {len(geometries)} decoder blocks")
    sizes = []
    for i, (entry, geometry) in enumerate(zip(given, geometries)):
        for part, limit in (("attention", geometry.attention_structures), ("mlp", geometry.mlp_structures)):
            if entry[part] > limit:
                raise OsscarConfigError(
                    f"block_sizes[{i}][{part!r}] = {entry[part]} but block {i} has only {limit} {part} structures")
        if config.round_to > 1 and entry["mlp"] != geometry.mlp_structures and entry["mlp"] % config.round_to:
            raise OsscarConfigError(
                f"block_sizes[{i}]['mlp'] = {entry['mlp']} is not a multiple of round_to={config.round_to}")
        sizes.append(BlockSize(entry["attention"], entry["mlp"]))
    return sizes


def _uniform_fractions(config: Any, geometries: list[BlockGeometry]) -> list[BlockSize]:
    sizes = []
    for g in geometries:
        mlp = round_neurons(keep_count(g.mlp_structures, config.mlp_sparsity), g.mlp_structures, config.round_to)
        sizes.append(BlockSize(keep_count(g.attention_structures, config.attention_sparsity), mlp))
    return sizes


def uniform_budget_sizes(config: Any, geometries: list[BlockGeometry]) -> list[BlockSize]:
    """Same attention fraction everywhere, and the one neuron count (per block) that best meets the target."""
    target = config.sparsity_target
    dense = sum(g.cost(target, g.attention_structures, g.mlp_structures) for g in geometries)
    goal = (1.0 - config.sparsity) * dense
    attention = [g.attention_structures if g.attention_fixed else keep_count(g.attention_structures, config.sparsity)
                 for g in geometries]
    with_full_mlp = sum(g.cost(target, a, g.mlp_structures) for g, a in zip(geometries, attention))
    per_neuron = sum(g.unit_costs(target)["mlp"] for g in geometries)
    widest = max(g.mlp_structures for g in geometries)
    removed = (with_full_mlp - goal) / per_neuron if per_neuron > 0 else 0.0
    kept_fraction = max(0.0, min(1.0, 1.0 - max(removed, 0.0) / widest))
    return [BlockSize(a, round_neurons(round(kept_fraction * g.mlp_structures), g.mlp_structures, config.round_to))
            for g, a in zip(geometries, attention)]


def plan_fixed_sizes(config: Any, geometries: list[BlockGeometry]) -> list[BlockSize] | None:
    """The sizes when they follow from the config and the shapes alone (no measurement); None for a global
    allocation."""
    if config.block_sizes is not None:
        return explicit_sizes(config, geometries)
    if config.sparsity is None:
        return _uniform_fractions(config, geometries)
    if not uses_global_allocation(config):
        return uniform_budget_sizes(config, geometries)
    return None


def part_floors(config: Any, geometry: BlockGeometry) -> BlockSize:
    """The fewest attention structures and neurons a global allocation may leave in a block (``min_part_keep``;
    neurons rounded up to ``round_to``; every attention structure when the family's attention is fixed)."""
    attention = (geometry.attention_structures if geometry.attention_fixed
                 else part_floor(geometry.attention_structures, config.min_part_keep))
    return BlockSize(attention, part_floor(geometry.mlp_structures, config.min_part_keep, config.round_to))


def _floors(config: Any, geometries: list[BlockGeometry]) -> tuple[list[tuple[int, int]], dict[int, float]]:
    parts, blocks = [], {}
    target = config.sparsity_target
    for i, g in enumerate(geometries):
        floor = part_floors(config, g)
        parts.append((floor.attention, floor.mlp))
        dense = g.cost(target, g.attention_structures, g.mlp_structures)
        blocks[i] = (1.0 - config.min_block_keep) * dense
    return parts, blocks


def check_budget(config: Any, geometries: list[BlockGeometry]) -> None:
    """Refuse a global budget that the floors (``min_part_keep``, ``min_block_keep``) make impossible: the allowed
    sizes (whole structures, ``round_to``) are walked as the allocator walks them, so an allocation never fails
    after its measurements."""
    if not uses_global_allocation(config):
        if config.block_sizes is not None:
            explicit_sizes(config, geometries)
        return
    target = config.sparsity_target
    dense = sum(g.cost(target, g.attention_structures, g.mlp_structures) for g in geometries)
    _, blocks = _floors(config, geometries)
    try:
        allocate(_part_curves(config, geometries, lambda block, part, sizes: [0.0] * len(sizes)),
                 config.sparsity * dense, blocks)
    except ValueError:
        most = _most_removable(config, geometries)
        raise OsscarConfigError(
            f"sparsity={config.sparsity} asks to remove {config.sparsity * dense:.4g} of the decoder blocks' "
            f"{dense:.4g} {target}, but min_part_keep={config.min_part_keep} and min_block_keep="
            f"{config.min_block_keep} allow at most {most:.4g} ({most / dense:.1%}): lower the floors or the sparsity"
        ) from None


def _most_removable(config: Any, geometries: list[BlockGeometry]) -> float:
    """The most cost the floors let a global allocation remove (whole structures aside)."""
    parts, blocks = _floors(config, geometries)
    most = 0.0
    for i, (g, (a_min, n_min)) in enumerate(zip(geometries, parts)):
        units, bases = g.unit_costs(config.sparsity_target), g.base_costs(config.sparsity_target)
        removable = (g.attention_structures - a_min) * units["attention"] + (g.mlp_structures - n_min) * units["mlp"]
        removable += sum(bases[part] for part, floor in (("attention", a_min), ("mlp", n_min)) if floor == 0)
        most += min(removable, blocks[i])
    return most


def _part_curves(config: Any, geometries: list[BlockGeometry],
                 damage: Callable[[int, str, list[int]], list[float]]) -> list[PartCurve]:
    """One curve per (block, part) over its allowed sizes, with ``damage(block, part, sizes)``."""
    parts, _ = _floors(config, geometries)
    curves = []
    for i, (g, (a_min, n_min)) in enumerate(zip(geometries, parts)):
        units, bases = g.unit_costs(config.sparsity_target), g.base_costs(config.sparsity_target)
        for part, full, floor, step in (("attention", g.attention_structures, a_min, 1),
                                        ("mlp", g.mlp_structures, n_min, config.round_to)):
            sizes = allowed_sizes(full, floor, step)
            curves.append(PartCurve(i, part, sizes, damage(i, part, sizes), units[part], bases[part]))
    return curves


def global_sizes(config: Any, geometries: list[BlockGeometry], damage: dict[tuple[int, str], dict[int, float]]
                 ) -> list[BlockSize]:
    """Spend the global budget on measured damage: ``damage[(block, part)]`` maps kept counts to damage (the
    allowed sizes of :func:`allowed_sizes` must all be there; the dense count maps to 0)."""
    target = config.sparsity_target
    _, blocks = _floors(config, geometries)
    curves = _part_curves(config, geometries, lambda i, part, sizes: [damage[(i, part)][k] for k in sizes])
    dense = sum(g.cost(target, g.attention_structures, g.mlp_structures) for g in geometries)
    kept = allocate(curves, config.sparsity * dense, blocks)
    return [BlockSize(kept[(i, "attention")], kept[(i, "mlp")]) for i in range(len(geometries))]
