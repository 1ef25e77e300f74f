"""A CNN's global budget on synthetic block geometries (no model): the promise of
:func:`osscar_hf.budgets.channel_plan.global_channel_widths` and the refusal of impossible budgets, against brute
force over every combination of widths."""

from __future__ import annotations

import itertools
import random

import pytest

from osscar_hf.budgets.channel_geometry import ChannelGeometry, CostTerm
from osscar_hf.budgets.channel_plan import (
    channel_floors,
    check_channel_budget,
    global_channel_widths,
    uniform_channel_widths,
)
from osscar_hf.budgets.plan import allowed_sizes
from osscar_hf.config import OsscarConfig
from osscar_hf.errors import OsscarConfigError


def _geometry(rng: random.Random) -> ChannelGeometry:
    """A block of one or two problems (a bottleneck's: with the product term), random coefficients."""
    if rng.random() < 0.5:
        w = rng.randint(3, 8)
        return ChannelGeometry((w,), rng.uniform(0, 50), (CostTerm(rng.uniform(5, 40), 0),))
    a, b = rng.randint(3, 6), rng.randint(3, 6)
    terms = (CostTerm(rng.uniform(2, 20), 0), CostTerm(rng.uniform(1, 9), 0, 1), CostTerm(rng.uniform(2, 20), 1))
    return ChannelGeometry((a, b), rng.uniform(0, 50), terms)


def _damage(rng: random.Random, geometries: list[ChannelGeometry], config: OsscarConfig):
    damage = {}
    for b, g in enumerate(geometries):
        for p, (w, floor) in enumerate(zip(g.widths, channel_floors(config, g))):
            sizes = allowed_sizes(w, floor, config.round_to)
            steps = sorted(rng.uniform(0, 1) for _ in sizes[1:])  # convex: increasing increments
            values = [0.0]
            for s in steps:
                values.append(values[-1] + s)
            damage[(b, p)] = dict(zip(sizes, values))
    return damage


def _least(config: OsscarConfig, geometries: list[ChannelGeometry]) -> float:
    """Brute force: the least total cost the floors allow (every combination of every block's widths)."""
    least = 0.0
    for g in geometries:
        options = [g.cost(k) for k in itertools.product(*[allowed_sizes(w, f, config.round_to) for w, f in
                                                          zip(g.widths, channel_floors(config, g))])
                   if g.cost(k) >= config.min_block_keep * g.dense - 1e-9]
        least += min(options)
    return least


@pytest.mark.parametrize("seed", range(150))
def test_global_widths_keep_the_promise(seed):
    rng = random.Random(seed)
    geometries = [_geometry(rng) for _ in range(rng.randint(2, 4))]
    config = OsscarConfig(sparsity=rng.choice([0.2, 0.4, 0.6, 0.75]), min_part_keep=rng.choice([0.0, 0.3]),
                          min_block_keep=rng.choice([0.0, 0.2, 0.5]), round_to=rng.choice([1, 1, 2]))
    goal = (1 - config.sparsity) * sum(g.dense for g in geometries)
    least = _least(config, geometries)
    if least > goal + 1e-9:
        with pytest.raises(OsscarConfigError, match=f"sparsity={config.sparsity} asks to keep"):
            check_channel_budget(config, geometries)
        return
    check_channel_budget(config, geometries)
    widths = global_channel_widths(config, geometries, _damage(rng, geometries, config))
    total = sum(g.cost(k) for g, k in zip(geometries, widths))
    assert total <= goal + 1e-9
    for g, kept in zip(geometries, widths):
        assert g.cost(kept) >= config.min_block_keep * g.dense - 1e-9
        for p, (k, w, floor) in enumerate(zip(kept, g.widths, channel_floors(config, g))):
            sizes = allowed_sizes(w, floor, config.round_to)
            assert k in sizes
            if k != w:  # adding back the next allowed count would not fit: short by less than one step
                more = list(kept)
                more[p] = sizes[sizes.index(k) - 1]
                assert total - g.cost(kept) + g.cost(more) > goal


@pytest.mark.parametrize("seed", range(10))
def test_uniform_widths_are_the_largest_fraction_within_the_goal(seed):
    rng = random.Random(seed)
    geometries = [_geometry(rng) for _ in range(3)]
    config = OsscarConfig(sparsity=0.5, allocation="uniform")
    goal = 0.5 * sum(g.dense for g in geometries)
    widths = uniform_channel_widths(config, geometries)
    assert sum(g.cost(k) for g, k in zip(geometries, widths)) <= goal
    fractions = [k / w for g, kept in zip(geometries, widths) for k, w in zip(kept, g.widths)]
    larger = [f for f in (x / 200 for x in range(201)) if f > max(fractions)]
    for f in larger:  # every larger common fraction breaks the goal (or keeps the same counts)
        counts = [tuple(max(1, round(f * w)) for w in g.widths) for g in geometries]
        assert counts == widths or sum(g.cost(k) for g, k in zip(geometries, counts)) > goal


def test_output_factor_of_a_rank_deficient_gradient_moment():
    """A consumer's output-gradient moment with channels the first prune removed (zero rows and columns), fewer
    gradient rows than channels and a wide range of scales: the plain factorisation fails, the retries (float64,
    more ridge) give a factor with L L^T = G + a small ridge."""
    import torch

    from osscar_hf.solver.curves import RIDGES, output_factor

    g = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 256)
    g[:, ::2] = 0
    G = g.T @ g / 4
    scale = float(G.diagonal().mean())
    assert int(torch.linalg.cholesky_ex(G + RIDGES[0] * scale * torch.eye(256))[1]) != 0
    L = output_factor(G, torch.float32)
    assert L.dtype == torch.float32 and torch.isfinite(L).all()
    error = L.double() @ L.double().T - G.double()
    assert float(error.abs().max()) <= 1.01 * RIDGES[-1] * scale


def test_output_factor_refuses_what_no_ridge_mends():
    import torch

    from osscar_hf.solver.curves import output_factor

    with pytest.raises(ValueError, match="not positive definite even with a ridge"):
        output_factor(-torch.eye(3), torch.float32)
