"""Budget-neutral exchanges between the parts of a global allocation (OSSCAR's allocation search).

An exchange grows one (block, part) by one step (an attention structure, or about ``1 / MOVE_STEPS`` of a block's
neurons) and shrinks a part of another block by the least that pays for it; what is left over goes to the
receiver's neurons, then to other blocks' neurons where a run of them fits. The plan's total cost therefore never exceeds the target, and an exchange that
would leave it short by more than before (and by a run of ``round_to`` neurons or more) is not proposed. The floors
(``min_part_keep``, ``min_block_keep``), ``round_to`` and an attention the family cannot prune hold as in
:func:`osscar_hf.budgets.global_sizes`.
"""

from __future__ import annotations

import random
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from .geometry import BlockGeometry
from .plan import allowed_sizes, part_floors
from .sizes import BlockSize

__all__ = ["ExchangeBudget", "propose_exchange"]

MOVE_STEPS = 24  # a receiving MLP grows by about 1/24 of its neurons (64 of SmolLM2's 1536)
# (donor part, receiver part, probability): neurons between MLPs most often; an attention structure for neurons, or
# back, otherwise (the attention structures are few and coarse).
EXCHANGES: tuple[tuple[str, str, float], ...] = (("mlp", "mlp", 0.7), ("attention", "mlp", 0.15),
                                                 ("mlp", "attention", 0.15))
TRIES = 100  # random draws before giving up on finding an exchange that fits


@dataclass(frozen=True)
class ExchangeBudget:
    """What an exchange must respect: every block's allowed sizes per part, its least cost, and the total."""

    geometries: tuple[BlockGeometry, ...]
    target: str  # "params" or "flops"
    limit: float  # the most cost the blocks may keep in total
    sizes: tuple[dict[str, list[int]], ...]  # per block and part: allowed kept counts, decreasing from the dense one
    least: tuple[float, ...]  # per block: the least cost it may keep (min_block_keep)
    run_cost: float  # the cheapest run of round_to neurons: how far short of the target a plan may fall
    steps: tuple[int, ...]  # per block: neurons a receiving MLP grows by

    @classmethod
    def from_config(cls, config: Any, geometries: list[BlockGeometry]) -> ExchangeBudget:
        target, round_to = config.sparsity_target, config.round_to
        dense = [g.cost(target, g.attention_structures, g.mlp_structures) for g in geometries]
        sizes, steps = [], []
        for g in geometries:
            floor = part_floors(config, g)
            sizes.append({"attention": allowed_sizes(g.attention_structures, floor.attention),
                          "mlp": allowed_sizes(g.mlp_structures, floor.mlp, round_to)})
            steps.append(round_to * max(1, round(g.mlp_structures / (MOVE_STEPS * round_to))))
        run_cost = min(g.unit_costs(target)["mlp"] for g in geometries) * round_to
        return cls(geometries=tuple(geometries), target=target, limit=(1.0 - config.sparsity) * sum(dense),
                   sizes=tuple(sizes), least=tuple(config.min_block_keep * d for d in dense), run_cost=run_cost,
                   steps=tuple(steps))

    def total(self, sizes: list[BlockSize]) -> float:
        return sum(g.cost(self.target, s.attention, s.mlp) for g, s in zip(self.geometries, sizes))

    def block_fits(self, index: int, size: BlockSize) -> bool:
        return self.geometries[index].cost(self.target, size.attention, size.mlp) >= self.least[index] - 1e-6


def _with(size: BlockSize, part: str, count: int) -> BlockSize:
    return BlockSize(count, size.mlp) if part == "attention" else BlockSize(size.attention, count)


def _count(size: BlockSize, part: str) -> int:
    return size.attention if part == "attention" else size.mlp


def _grown(budget: ExchangeBudget, index: int, part: str, count: int) -> int | None:
    """The receiver's next count up (one structure, or one step of neurons), or None at its dense count."""
    allowed = budget.sizes[index][part]
    if count >= allowed[0]:
        return None
    goal = count + (1 if part == "attention" else budget.steps[index])
    above = [k for k in allowed if count < k <= goal]
    return max(above) if above else min(k for k in allowed if k > count)


def _spend(sizes: list[BlockSize], budget: ExchangeBudget, index: int) -> None:
    """Grow block ``index``'s neurons, one allowed count at a time, while the total stays within the target."""
    while more := [k for k in budget.sizes[index]["mlp"] if k > sizes[index].mlp]:
        trial = _with(sizes[index], "mlp", min(more))
        if budget.total(sizes[:index] + [trial] + sizes[index + 1:]) > budget.limit:
            return
        sizes[index] = trial


def exchange(sizes: list[BlockSize], budget: ExchangeBudget, donor: tuple[int, str], receiver: tuple[int, str]
             ) -> list[BlockSize] | None:
    """``sizes`` with ``receiver`` grown by a step and ``donor`` shrunk by the least that pays for it, or None when
    that does not fit the floors and the target (see the module docstring)."""
    (i, donor_part), (j, receiver_part) = donor, receiver
    if i == j:
        return None
    new = list(sizes)
    short_before = budget.limit - budget.total(sizes)
    grown = _grown(budget, j, receiver_part, _count(new[j], receiver_part))
    if grown is None:
        return None
    new[j] = _with(new[j], receiver_part, grown)
    current = _count(new[i], donor_part)
    for count in (k for k in budget.sizes[i][donor_part] if k < current):  # the least shrink first
        new[i] = _with(sizes[i], donor_part, count)
        if not budget.block_fits(i, new[i]):
            return None
        if budget.total(new) <= budget.limit:
            break
    else:
        return None
    # What the donor freed beyond the step goes to the receiver's neurons, then to any other block's that fit.
    others = [k for k in range(len(new)) if k not in (i, j)] + ([i] if donor_part != "mlp" else [])
    for k in ([j] if receiver_part == "mlp" else []) + others:
        _spend(new, budget, k)
    short = budget.limit - budget.total(new)
    return new if short < budget.run_cost or short <= short_before + 1e-6 else None


def propose_exchange(sizes: list[BlockSize], budget: ExchangeBudget, rng: random.Random,
                     tried: Container[tuple[BlockSize, ...]] = frozenset()) -> list[BlockSize] | None:
    """A random exchange (:data:`EXCHANGES`, two distinct blocks) that fits and is not in ``tried``, or None after
    :data:`TRIES` draws (or with fewer than two blocks)."""
    if len(sizes) < 2:
        return None
    kinds = [(d, r) for d, r, _ in EXCHANGES]
    weights = [p for _, _, p in EXCHANGES]
    for _ in range(TRIES):
        donor_part, receiver_part = rng.choices(kinds, weights)[0]
        i, j = rng.sample(range(len(sizes)), 2)
        new = exchange(sizes, budget, (i, donor_part), (j, receiver_part))
        if new is not None and tuple(new) not in tried:
            return new
    return None
