"""Budgets: the blocks' costs, uniform and explicit plans, rounding, floors and the global allocator."""

from __future__ import annotations

import itertools

import pytest
import torch

from osscar_hf.arch import get_spec
from osscar_hf.budgets import (
    BlockGeometry,
    BlockSize,
    PartCurve,
    allocate,
    lower_hull,
    allowed_sizes,
    block_geometries,
    check_budget,
    part_floor,
    plan_fixed_sizes,
    round_neurons,
)
from osscar_hf.budgets.flap import flap_sizes, standardised_structure_scores
from osscar_hf.config import OsscarConfig
from osscar_hf.errors import OsscarConfigError
from osscar_hf.pipeline import PARTS, block_consumers
from osscar_hf.surgery import prune_attention, prune_mlp
from tests.conftest import make_model


def _block_params(model) -> int:
    spec = get_spec(model)
    return sum(p.numel() for p in model.get_submodule(spec.blocks).parameters())


# --------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("kind", ["opt", "llama-gqa", "qwen2"])
def test_geometry_counts_every_parameter_a_structure_takes_with_it(kind):
    """Removing structures removes exactly the geometry's per-structure parameters."""
    import torch

    model = make_model(kind)
    spec = get_spec(model)
    m, n_rep, head_dim = spec.group_geometry(model.config)
    (g0, *_), total = block_geometries(model, spec, seq_len=64), _block_params(model)
    assert sum(g.params(g.attention_structures, g.mlp_structures) for g in block_geometries(model, spec, seq_len=64)) \
        == total
    block = model.get_submodule(spec.blocks)[0]
    prune_attention(block, spec, torch.tensor([0]), n_rep=n_rep, head_dim=head_dim, num_groups=m)
    prune_mlp(block, spec, torch.arange(10))
    assert _block_params(model) == total - (m - 1) * g0.attention_params - (g0.mlp_structures - 10) * g0.mlp_params


def test_moe_geometry_counts_the_experts_and_the_shared_expert_at_the_routed_fraction():
    """A structure of a mixture of experts is one neuron of every expert; a shared expert keeps the routed fraction
    of its own neurons (rounded to a multiple of 8), and the geometry counts exactly what that leaves."""
    import torch

    from osscar_hf.surgery import expert_neurons

    model = make_model("qwen2_moe")
    spec = get_spec(model)
    geometries = block_geometries(model, spec, seq_len=64)
    g0, g1 = geometries
    assert (g0.mlp_structures, g0.shared_structures, g0.shared_params) == (32, 48, 3 * 32)
    assert sum(g.params(g.attention_structures, g.mlp_structures) for g in geometries) == _block_params(model)
    assert [g0.shared_kept(k) for k in (0, 1, 8, 16, 31, 32)] == [0, 8, 16, 24, 48, 48]
    block = model.get_submodule(spec.blocks)[0]
    prune_mlp(block, spec, expert_neurons(torch.arange(8).expand(4, 8), 32))
    prune_mlp(block, spec.shared_expert_spec(), torch.arange(g0.shared_kept(8)))
    assert _block_params(model) == g0.params(g0.attention_structures, 8) + g1.params(g1.attention_structures, 32)


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2", "phi3"])
@pytest.mark.parametrize("per_group", [0, 1, 2])
def test_query_head_geometry_counts_the_heads_and_the_kv_heads_that_go_with_the_last(kind, per_group):
    """With query heads as structures, a block keeping ``per_group`` heads of each KV group has exactly the
    geometry's parameters: the KV heads (the base) go only with the last query head."""
    import torch

    from osscar_hf.remote_code.configuration_osscar import kept_query_heads

    model = make_model(kind)
    spec = get_spec(model)
    kv, n_rep, head_dim = spec.group_geometry(model.config)
    g = block_geometries(model, spec, seq_len=64, attention_structure="query_heads")[0]
    assert g.attention_structures == n_rep and g.params(n_rep, g.mlp_structures) == _block_params(model) // 2
    block = model.get_submodule(spec.blocks)[0]
    groups = torch.arange(kv) if per_group else torch.tensor([], dtype=torch.long)
    prune_attention(block, spec, groups, n_rep=n_rep, head_dim=head_dim, num_groups=kv,
                    kept_heads=kept_query_heads(groups, n_rep, per_group))
    assert sum(p.numel() for p in block.parameters()) == g.params(per_group, g.mlp_structures)
    assert (g.flops(per_group, 0) > 0) == (per_group > 0) and g.attention_base_params > 0


def test_geometry_flops_include_the_attention_scores_of_the_context():
    model = make_model("llama-gqa")
    spec = get_spec(model)
    short, long = block_geometries(model, spec, seq_len=15)[0], block_geometries(model, spec, seq_len=63)[0]
    # 2 query heads of head_dim 8 per KV group: scores and values cost 2 * 16 * context per token.
    assert long.attention_flops - short.attention_flops == 2 * 16 * (32 - 8)
    assert long.mlp_flops == short.mlp_flops == 3 * 32
    assert short.flops(0, 0) == 0


def test_geometry_with_biases_counts_the_biases_a_method_adds():
    model = make_model("llama-gqa")
    spec = get_spec(model)
    plain, biased = block_geometries(model, spec, seq_len=8)[0], block_geometries(model, spec, seq_len=8,
                                                                                 with_biases=True)[0]
    assert biased.mlp_params == plain.mlp_params + 2  # gate and up rows' biases
    assert biased.attention_params == plain.attention_params + 2 * 8 + 2 * 8  # q rows (2 heads) + k and v rows
    assert biased.fixed_params == plain.fixed_params + 32 + 32  # o_proj and down_proj biases


# --------------------------------------------------------------------------- rounding and floors
def test_round_neurons():
    assert [round_neurons(k, 100, 8) for k in (0, 3, 4, 12, 96, 99, 100)] == [0, 8, 8, 16, 96, 100, 100]  # 3: never 0
    assert round_neurons(37, 48, 1) == 37


def test_part_floor_and_allowed_sizes():
    assert part_floor(3, 0.05) == 1 and part_floor(3, 0.0) == 0 and part_floor(48, 0.1, 8) == 8
    assert allowed_sizes(5, 2) == [5, 4, 3, 2]
    assert allowed_sizes(20, 0, 8) == [20, 16, 8, 0]


# --------------------------------------------------------------------------- fixed plans
def test_uniform_fractions_give_every_block_the_paper_sizes():
    model = make_model("llama-gqa")
    geometries = block_geometries(model, get_spec(model), seq_len=32)
    sizes = plan_fixed_sizes(OsscarConfig(0.5, 0.25), geometries)
    assert sizes == [BlockSize(1, 36)] * 2
    assert plan_fixed_sizes(OsscarConfig(0.5, 0.25, round_to=8), geometries) == [BlockSize(1, 40)] * 2


@pytest.mark.parametrize("target", ["params", "flops"])
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5])
def test_uniform_budget_meets_the_target_within_one_neuron_per_block(sparsity, target):
    model = make_model("llama-gqa", num_hidden_layers=3)
    geometries = block_geometries(model, get_spec(model), seq_len=32)
    sizes = plan_fixed_sizes(OsscarConfig(sparsity=sparsity, allocation="uniform", sparsity_target=target),
                             geometries)
    assert len(set(sizes)) == 1
    dense = sum(g.cost(target, g.attention_structures, g.mlp_structures) for g in geometries)
    kept = sum(g.cost(target, s.attention, s.mlp) for g, s in zip(geometries, sizes))
    assert abs(kept - (1 - sparsity) * dense) <= sum(g.unit_costs(target)["mlp"] for g in geometries) / 2 + 1e-6


def test_explicit_sizes_are_used_as_given_and_checked():
    model = make_model("llama-gqa")
    geometries = block_geometries(model, get_spec(model), seq_len=32)
    given = [{"attention": 2, "mlp": 48}, {"attention": 0, "mlp": 5}]
    assert plan_fixed_sizes(OsscarConfig(block_sizes=given), geometries) == [BlockSize(2, 48), BlockSize(0, 5)]
    with pytest.raises(OsscarConfigError, match="block_sizes has 1 entries but the model has 2 decoder blocks"):
        plan_fixed_sizes(OsscarConfig(block_sizes=given[:1]), geometries)
    with pytest.raises(OsscarConfigError, match=r"block_sizes\[1\]\['attention'\] = 3 but block 1 has only 2"):
        plan_fixed_sizes(OsscarConfig(block_sizes=[given[0], {"attention": 3, "mlp": 5}]), geometries)
    with pytest.raises(OsscarConfigError, match=r"block_sizes\[1\]\['mlp'\] = 5 is not a multiple of round_to=8"):
        plan_fixed_sizes(OsscarConfig(block_sizes=given, round_to=8), geometries)


def test_a_budget_the_floors_forbid_is_refused():
    model = make_model("llama-gqa")
    geometries = block_geometries(model, get_spec(model), seq_len=32)
    with pytest.raises(OsscarConfigError, match=r"sparsity=0\.9 asks to remove .* allow at most .* lower the floors"):
        check_budget(OsscarConfig(sparsity=0.9, min_block_keep=0.5), geometries)
    check_budget(OsscarConfig(sparsity=0.9, min_block_keep=0.0, min_part_keep=0.0), geometries)


# --------------------------------------------------------------------------- the allocator
def _brute_force(curves, remove):
    best = None
    for choice in itertools.product(*[range(len(c.sizes)) for c in curves]):
        removed = sum((c.sizes[0] - c.sizes[i]) * c.unit for c, i in zip(curves, choice))
        if removed < remove:
            continue
        damage = sum(c.damage[i] for c, i in zip(curves, choice))
        if best is None or (damage, removed) < best[:2]:
            best = (damage, removed, choice)
    return best


def test_allocate_matches_brute_force_on_convex_curves():
    curves = [
        PartCurve(0, "attention", [3, 2, 1, 0], [0.0, 1.0, 3.0, 9.0], 10.0),
        PartCurve(0, "mlp", [6, 5, 4, 3, 2, 1, 0], [0.0, 0.1, 0.3, 0.6, 1.0, 2.0, 4.0], 2.0),
        PartCurve(1, "attention", [3, 2, 1, 0], [0.0, 0.2, 0.5, 5.0], 10.0),
        PartCurve(1, "mlp", [6, 5, 4, 3, 2, 1, 0], [0.0, 0.5, 1.1, 1.8, 2.6, 3.5, 4.5], 2.0),
    ]
    for remove in (4.0, 10.0, 24.0, 30.0, 41.0):
        kept = allocate(curves, remove)
        removed = sum((c.sizes[0] - kept[(c.block, c.part)]) * c.unit for c in curves)
        damage = sum(c.damage[c.sizes.index(kept[(c.block, c.part)])] for c in curves)
        best_damage, _, _ = _brute_force(curves, remove)
        assert removed >= remove and removed - remove < 2.0  # within one neuron (unit 2) of the target
        assert damage <= best_damage + 1.0 + 1e-9  # the greedy hull walk, off by at most the last step's damage


def test_allocate_spends_on_the_cheapest_part_and_respects_block_floors():
    cheap = PartCurve(0, "mlp", [4, 3, 2, 1, 0], [0.0, 0.01, 0.02, 0.03, 0.04], 1.0)
    dear = PartCurve(1, "mlp", [4, 3, 2, 1, 0], [0.0, 1.0, 2.0, 3.0, 4.0], 1.0)
    assert allocate([cheap, dear], 3.0) == {(0, "mlp"): 1, (1, "mlp"): 4}
    assert allocate([cheap, dear], 3.0, block_floors={0: 2.0}) == {(0, "mlp"): 2, (1, "mlp"): 3}


# --------------------------------------------------------------------------- FLAP's allocation
def test_flap_standardises_within_a_layer_and_ranks_globally():
    import torch

    scores = standardised_structure_scores(torch.tensor([1.0, 2.0, 3.0, 10.0]), 2)
    assert scores.shape == (2,) and float(scores.sum()) == pytest.approx(0.0, abs=1e-12) and scores[1] > scores[0]
    model = make_model("llama-gqa")
    geometries = block_geometries(model, get_spec(model), seq_len=32)
    ranked = {(b, p): torch.linspace(-1, 1, g.attention_structures if p == "attention" else g.mlp_structures)
              .flip(0) + (1.0 if b == 0 else 0.0) for b, g in enumerate(geometries) for p in PARTS}
    sizes = flap_sizes(ranked, geometries, sparsity=0.4, target="params", floors=[(0, 0), (0, 0)])
    kept = sum(g.params(s.attention, s.mlp) for g, s in zip(geometries, sizes))
    dense = sum(g.params(g.attention_structures, g.mlp_structures) for g in geometries)
    assert kept <= 0.6 * dense and 0.6 * dense - kept < geometries[0].mlp_params  # within one neuron
    assert sizes[0].mlp > sizes[1].mlp  # block 0 scores higher everywhere: it keeps more
    # A block floor keeps block 1 at half its parameters, whatever its scores; the budget is still met.
    floored = flap_sizes(ranked, geometries, sparsity=0.4, target="params", floors=[(0, 0), (0, 0)],
                         min_block_keep=0.5)
    g1 = geometries[1]
    assert g1.params(floored[1].attention, floored[1].mlp) >= 0.5 * g1.params(g1.attention_structures,
                                                                               g1.mlp_structures)
    assert g1.params(sizes[1].attention, sizes[1].mlp) < 0.5 * g1.params(g1.attention_structures, g1.mlp_structures)
    kept = sum(g.params(s.attention, s.mlp) for g, s in zip(geometries, floored))
    assert kept <= 0.6 * dense and 0.6 * dense - kept < geometries[0].mlp_params


def test_block_consumers_are_the_two_output_projections():
    model = make_model("opt")
    block = model.get_submodule(get_spec(model).blocks)[0]
    consumers = block_consumers(block, get_spec(model))
    assert consumers["attention"] is block.self_attn.out_proj and consumers["mlp"] is block.fc2


def _min_slope_chain(curve: PartCurve) -> list[int]:
    """Brute force: from each point, the nearest later point of smallest damage per unit of cost removed."""
    chain, at = [0], 0
    while at + 1 < len(curve.sizes):
        slopes = [((curve.damage[j] - curve.damage[at]) / ((curve.sizes[at] - curve.sizes[j]) * curve.unit), j)
                  for j in range(at + 1, len(curve.sizes))]
        best = min(s for s, _ in slopes)
        at = next(j for s, j in slopes if s <= best + 1e-12 * abs(best))
        chain.append(at)
    return chain


@pytest.mark.parametrize("seed", range(6))
def test_the_lower_hull_is_the_chain_of_smallest_slopes(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40
    damage = torch.cat([torch.zeros(1), torch.rand(n - 1, generator=g).cumsum(0)])
    if seed % 2:  # with collinear runs
        damage[10:20] = torch.linspace(float(damage[10]), float(damage[10]) + 5.0, 10)
    curve = PartCurve(0, "mlp", list(range(n, 0, -1)), damage.tolist(), 2.0)
    assert lower_hull(curve) == _min_slope_chain(curve)


def test_the_planning_prune_keeps_every_part_it_measures():
    from osscar_hf.budgets import uniform_budget_sizes
    from osscar_hf.pipeline.sensitivity import first_prune_sizes

    model = make_model("llama-gqa", num_hidden_layers=2)
    geometries = block_geometries(model, get_spec(model), seq_len=32)
    config = OsscarConfig(sparsity=0.97, min_part_keep=0.0, min_block_keep=0.0)
    uniform = uniform_budget_sizes(config, geometries)
    assert any(s.attention == 0 or s.mlp == 0 for s in uniform)  # the target itself empties a part
    assert all(s.attention >= 1 and s.mlp >= 1 for s in first_prune_sizes(config, geometries))
    floored = OsscarConfig(sparsity=0.5, min_part_keep=0.6, min_block_keep=0.0)
    for size, g in zip(first_prune_sizes(floored, geometries), geometries):
        assert size.mlp >= 0.6 * g.mlp_structures and size.attention >= 0.6 * g.attention_structures


def test_a_budget_only_fractions_of_a_structure_could_meet_is_refused_before_any_work():
    model = make_model("llama-gqa")
    geometries = block_geometries(model, get_spec(model), seq_len=32)
    # round_to=64 (the full width) leaves each MLP all or nothing, so the floors' continuous bound overstates what
    # whole structures can remove: the allocator would fail only after the measurements.
    g = geometries[0]
    dense = sum(x.params(x.attention_structures, x.mlp_structures) for x in geometries)
    config = OsscarConfig(sparsity=0.45, round_to=g.mlp_structures, min_part_keep=0.0, min_block_keep=0.55)
    with pytest.raises(OsscarConfigError, match=r"sparsity=0\.45 asks to remove .* lower the floors or the sparsity"):
        check_budget(config, geometries)
    # ... while each block's floor alone, counted in fractions, would allow exactly that much
    caps = sum(0.45 * x.params(x.attention_structures, x.mlp_structures) for x in geometries)
    assert caps == pytest.approx(0.45 * dense)


# --------------------------------------------------------------------------- query heads
def test_a_curve_base_is_removed_with_the_last_structure_only():
    curve = PartCurve(0, "attention", [3, 2, 1, 0], [0.0, 1.0, 2.0, 3.0], unit=10.0, base=25.0)
    assert [curve.removed(j) for j in range(4)] == [0.0, 10.0, 20.0, 55.0]
    mlp = PartCurve(0, "mlp", [4, 3, 2, 1, 0], [0.0, 10.0, 20.0, 30.0, 40.0], unit=10.0)
    # The attention's hull runs straight to 0 (3 damage for 55 removed, the base included): removing 55 takes it all;
    # removing 30, its last step (35 with the base) no longer fits, and a neuron makes up the rest.
    assert allocate([curve, mlp], 55.0) == {(0, "attention"): 0, (0, "mlp"): 4}
    assert allocate([curve, mlp], 30.0) == {(0, "attention"): 1, (0, "mlp"): 3}


def test_flap_levels_rank_every_groups_heads_and_average_by_rank():
    from osscar_hf.budgets import level_scores

    heads = torch.tensor([1.0, 5.0, 3.0, 2.0, 0.0, 4.0])  # two KV groups of three query heads
    assert level_scores(heads, 2).tolist() == [4.5, 2.5, 0.5]


def test_flap_counts_the_base_with_the_first_structure_it_keeps():
    geometry = BlockGeometry(attention_structures=2, mlp_structures=2, attention_params=10, mlp_params=10,
                             fixed_params=0, attention_flops=0.0, mlp_flops=0.0, attention_base_params=20)
    scores = {(0, "attention"): torch.tensor([1.0, 0.5]), (0, "mlp"): torch.tensor([0.9, 0.8])}
    # 60 params dense; keep 50%: the first head (10 + base 20) outranks the neurons and fills the budget.
    sizes = flap_sizes(scores, [geometry], sparsity=0.5, target="params", floors=[(0, 0)])
    assert sizes[0].to_dict() == {"attention": 1, "mlp": 0}
