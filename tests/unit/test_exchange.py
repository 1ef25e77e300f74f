"""Budget-neutral exchanges of the allocation search (:mod:`osscar_hf.budgets.exchange`): a long random walk of
exchanges never keeps more than the target, never falls further short of it than one run of neurons (or than it
started), and keeps every size allowed (floors, ``round_to``, the block floor)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from osscar_hf.budgets import BlockGeometry, BlockSize, ExchangeBudget, global_sizes, propose_exchange
from osscar_hf.budgets.exchange import exchange
from osscar_hf.config import OsscarConfig


def _geometries() -> list[BlockGeometry]:
    """Blocks that differ: costs per structure, widths, a fixed attention (block 3)."""
    shapes = [(4, 96, 900, 30), (4, 64, 1100, 45), (2, 128, 700, 21), (4, 96, 900, 30)]
    return [BlockGeometry(attention_structures=a, mlp_structures=n, attention_params=pa, mlp_params=pn,
                          fixed_params=50, attention_flops=pa + 200.0, mlp_flops=float(pn),
                          attention_fixed=(i == 3))
            for i, (a, n, pa, pn) in enumerate(shapes)]


def _plan(config: OsscarConfig, geometries: list[BlockGeometry]) -> list[BlockSize]:
    damage = {}
    for i, g in enumerate(geometries):
        damage[(i, "attention")] = {k: float(g.attention_structures - k) ** 2 for k in range(g.attention_structures + 1)}
        damage[(i, "mlp")] = {k: (g.mlp_structures - k) ** 2 / (i + 1) for k in range(g.mlp_structures + 1)}
    return global_sizes(config, geometries, damage)


@pytest.mark.parametrize("target, round_to, floors", [("params", 1, 0.05), ("flops", 8, 0.0), ("params", 16, 0.25)])
def test_a_random_walk_of_exchanges_keeps_the_budget_and_the_allowed_sizes(target, round_to, floors):
    geometries = _geometries()
    config = OsscarConfig(sparsity=0.4, sparsity_target=target, round_to=round_to, min_part_keep=floors,
                          min_block_keep=0.3)
    budget = ExchangeBudget.from_config(config, geometries)
    sizes = _plan(config, geometries)
    short = budget.limit - budget.total(sizes)
    assert 0 <= short < budget.run_cost
    rng = random.Random(0)
    moved = 0
    for _ in range(300):
        new = propose_exchange(sizes, budget, rng)
        assert new is not None
        moved += new != sizes
        sizes = new
        assert 0 <= budget.limit - budget.total(sizes) < max(short, budget.run_cost) + 1e-6
        for i, size in enumerate(sizes):
            assert size.attention in budget.sizes[i]["attention"] and size.mlp in budget.sizes[i]["mlp"]
            assert budget.block_fits(i, size)
        assert sizes[3].attention == 4  # a fixed attention never moves
    assert moved == 300


def test_an_exchange_moves_one_step_to_the_receiver_and_the_least_from_the_donor():
    geometries = _geometries()[:3]
    config = OsscarConfig(sparsity=0.4, min_part_keep=0.0, min_block_keep=0.0)
    sizes = [BlockSize(2, 60), BlockSize(2, 40), BlockSize(1, 100)]
    budget = replace(ExchangeBudget.from_config(config, geometries), limit=0.0)
    budget = replace(budget, limit=budget.total(sizes) + 5)  # 5 short of the target
    # neurons from block 0 to block 1: block 1 gains its step (64 / 24 -> 3 neurons of 45, 135), block 0 pays with
    # the fewest of its neurons (30 each) that cover it: 5 (150); the 20 left buy nothing (block 2's cost 21)
    assert exchange(sizes, budget, (0, "mlp"), (1, "mlp")) == [BlockSize(2, 55), BlockSize(2, 43), BlockSize(1, 100)]
    # an attention structure of block 0 (900) for neurons of block 2 (21 each, 28 short of its 128): block 2 fills
    # up (588), the 317 left buy block 1 seven neurons (315)
    assert exchange(sizes, budget, (0, "attention"), (2, "mlp")) == [
        BlockSize(1, 60), BlockSize(2, 47), BlockSize(1, 128)]
    # an attention structure for block 1 (1100): block 0 pays with 37 neurons (1110); 15 left
    assert exchange(sizes, budget, (0, "mlp"), (1, "attention")) == [
        BlockSize(2, 23), BlockSize(3, 40), BlockSize(1, 100)]
    # block 1's neurons for block 0's attention (900): block 1 pays 20 (900); a full attention takes no more
    assert exchange(sizes, budget, (1, "mlp"), (0, "attention")) == [
        BlockSize(3, 60), BlockSize(2, 20), BlockSize(1, 100)]
    assert exchange([BlockSize(4, 60), *sizes[1:]], budget, (1, "mlp"), (0, "attention")) is None
    assert exchange(sizes, budget, (2, "mlp"), (0, "attention")) == [
        BlockSize(3, 60), BlockSize(2, 40), BlockSize(1, 57)]
    assert exchange(sizes, budget, (1, "mlp"), (1, "attention")) is None  # one block with itself
    one = ExchangeBudget.from_config(config, geometries[:1])
    assert propose_exchange(sizes[:1], one, random.Random(0)) is None  # nothing to exchange with


def test_an_exchange_already_tried_is_not_proposed_again():
    geometries = _geometries()[:2]
    config = OsscarConfig(sparsity=0.4, min_part_keep=0.0, min_block_keep=0.0)
    budget = ExchangeBudget.from_config(config, geometries)
    sizes = _plan(config, geometries)
    rng = random.Random(0)
    tried: set = set()
    while (new := propose_exchange(sizes, budget, rng, tried)) is not None:
        assert tuple(new) not in tried
        tried.add(tuple(new))
    assert 1 < len(tried) <= 4  # two blocks: each part of each block can only grow at the other's expense
