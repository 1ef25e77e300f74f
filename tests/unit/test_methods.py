"""Pruning methods: the registry, and each method's selection against its definition on small problems."""

from __future__ import annotations

import itertools

import pytest
import torch

from osscar_hf.errors import OsscarConfigError
from osscar_hf.methods import (
    LayerProblem,
    LayerStatistics,
    PruningMethod,
    Selection,
    SolveSettings,
    get_method,
    method_names,
    register_method,
)
from osscar_hf.solver import accumulate_cross_gram, accumulate_gram, new_gram

SOLVE = SolveSettings(step=1, swap_size=1, local_search_iters=5, damping=1e-3, dtype=torch.float64)


def _problem(group_size: int = 1, num_keep: int = 3, p: int = 6, q: int = 4, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, p, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, p, dtype=torch.float64)
    X = X + torch.linspace(-1, 1, p, dtype=torch.float64)  # non-zero means
    W = torch.randn(q, p, generator=g, dtype=torch.float64)
    H = new_gram(p)
    accumulate_gram(H, 0, X.float())
    stats = LayerStatistics(gram=H, mean=X.mean(0), mean_square=X.pow(2).mean(0), tokens=200)
    return X, W, LayerProblem(weight=W, bias=None, group_size=group_size, num_keep=num_keep, statistics=stats,
                              solve=SOLVE)


def test_registry_lists_every_method_and_refuses_unknown_ones():
    assert method_names()[:5] == ["osscar", "obs_greedy", "magnitude", "wanda_sp", "flap"]
    with pytest.raises(OsscarConfigError, match=r"method must be one of \['osscar', .*'flap'.*got 'nope'"):
        get_method("nope")


def test_a_config_naming_an_unregistered_method_loads_but_does_not_prune():
    from osscar_hf import OsscarConfig, OsscarPruner
    from osscar_hf.methods import describe_method

    # A model pruned with a method registered by the user's code records its name; it must load elsewhere.
    config = OsscarConfig.from_dict({"quant_method": "osscar", "mlp_sparsity": 0.5, "method": "someone_elses"})
    assert config.method == "someone_elses"
    assert "not registered here" in describe_method("someone_elses")
    assert describe_method("osscar") == get_method("osscar").description
    with pytest.raises(OsscarConfigError, match=r"method must be one of \['osscar'.*got 'someone_elses'"):
        OsscarPruner(config)
    with pytest.raises(OsscarConfigError, match="method must be a non-empty str"):
        OsscarConfig(mlp_sparsity=0.5, method="")


def test_a_new_method_is_one_class():
    class KeepFirst(PruningMethod):
        name = "keep_first_for_test"
        description = "keeps the first structures"

        def select(self, problem: LayerProblem) -> Selection:
            return Selection(torch.arange(problem.num_keep))

    register_method(KeepFirst)
    try:
        assert isinstance(get_method("keep_first_for_test"), KeepFirst)
        with pytest.raises(ValueError, match="already registered"):
            register_method(type("Other", (KeepFirst,), {}))
    finally:
        from osscar_hf import methods

        methods._METHODS.pop("keep_first_for_test")


def _best_by(scores: torch.Tensor, k: int) -> set[int]:
    return {int(i) for i in torch.topk(scores, k).indices}


def test_magnitude_keeps_the_largest_consumer_columns():
    _, W, problem = _problem(group_size=2)
    kept = get_method("magnitude").select(problem)
    norms = W.pow(2).sum(0).reshape(3, 2).sum(1)
    assert set(kept.kept_groups.tolist()) == _best_by(norms, 3) and kept.weight is None and kept.bias is None


def test_wanda_sp_weighs_columns_by_the_input_norm():
    X, W, problem = _problem()
    kept = get_method("wanda_sp").select(problem)
    scores = (W.abs() * X.pow(2).mean(0).sqrt()).sum(0)
    assert set(kept.kept_groups.tolist()) == _best_by(scores, 3) and kept.weight is None


def test_flap_keeps_high_fluctuation_and_compensates_the_mean():
    X, W, problem = _problem()
    problem.bias = torch.full((W.shape[0],), 0.5, dtype=torch.float64)
    chosen = get_method("flap").select(problem)
    fluctuation = X.var(0, unbiased=False) * W.pow(2).sum(0)
    kept = chosen.kept_groups.tolist()
    assert set(kept) == _best_by(fluctuation, 3) and chosen.weight is None
    pruned = [i for i in range(6) if i not in kept]
    # The output keeps its mean: bias + W_pruned E[x_pruned] is what the pruned channels gave on average.
    compensated = X[:, kept] @ W[:, kept].T + chosen.bias
    torch.testing.assert_close(compensated.mean(0), (X @ W.T + 0.5).mean(0))
    torch.testing.assert_close(chosen.bias, 0.5 + W[:, pruned] @ X[:, pruned].mean(0))


def _refit_error(X: torch.Tensor, W: torch.Tensor, kept: list[int]) -> float:
    Xs = X[:, kept]
    Ws = torch.linalg.lstsq(Xs, X @ W.T).solution
    return float((Xs @ Ws - X @ W.T).pow(2).sum())


@pytest.mark.parametrize("name", ["osscar", "obs_greedy"])
def test_gram_methods_refit_and_find_the_best_support_on_a_small_problem(name):
    X, W, problem = _problem(num_keep=3)
    chosen = get_method(name).select(problem)
    kept = chosen.kept_groups.tolist()
    errors = {c: _refit_error(X.float().double(), W, list(c)) for c in itertools.combinations(range(6), 3)}
    assert _refit_error(X.float().double(), W, kept) <= min(errors.values()) * 1.05
    assert chosen.weight.shape == (4, 3)
    assert chosen.report["objective"] <= chosen.report["objective_stage_a"] + 1e-9


@pytest.mark.parametrize("name", ["osscar", "obs_greedy"])
def test_gram_methods_refit_to_the_cross_gram_they_are_handed(name):
    """Dense targets (ALGORITHM.md section 5): given ``cross_gram = X_pruned^T X_dense / N``, the kept weights are
    the ridge fit of the dense stream's outputs, ``(H + lam I)_SS^-1 ((cross_gram + lam I) W_hat)_S``, not of the
    pruned stream's own outputs."""
    X, W, problem = _problem(num_keep=3)
    X_dense = X + 0.5 * torch.randn(X.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    C = new_gram(X.shape[1])
    accumulate_cross_gram(C, 0, X.float(), X_dense.float())
    problem.statistics.cross_gram = C
    H64, C64 = problem.statistics.gram.double(), C.double()  # copies: the solve may work in the Gram's storage
    chosen = get_method(name).select(problem)
    kept, lam = chosen.kept_groups, chosen.report["damping"]
    eye = lam * torch.eye(X.shape[1], dtype=torch.float64)
    H_kept = (H64 + eye)[kept][:, kept]
    dense_fit = torch.linalg.solve(H_kept, ((C64 + eye) @ W.T)[kept]).T
    own_fit = torch.linalg.solve(H_kept, ((H64 + eye) @ W.T)[kept]).T
    assert (dense_fit - own_fit).abs().max() > 0.05 * own_fit.abs().max()  # the two targets really differ
    torch.testing.assert_close(chosen.weight.double(), dense_fit, rtol=1e-6, atol=1e-8)


def test_obs_greedy_is_step_one_without_local_search(monkeypatch):
    import osscar_hf.methods.osscar as module

    seen = {}
    real = module.solve_layer

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "solve_layer", spy)
    get_method("obs_greedy").select(_problem()[2])
    assert (seen["step"], seen["local_search_iters"]) == (1, 0)
    get_method("osscar").select(_problem()[2])
    assert (seen["step"], seen["local_search_iters"]) == (SOLVE.step, SOLVE.local_search_iters)


@pytest.mark.parametrize("fields, message", [
    ({"mlp_sparsity": 0.5, "dense_targets": True, "method": "magnitude"}, "method 'magnitude' does not refit"),
    ({"sparsity": 0.3, "allocation": "global", "method": "wanda_sp"}, "method 'wanda_sp' has no global allocation"),
])
def test_a_method_that_cannot_do_what_the_fields_ask_is_refused_before_any_work(fields, message):
    from osscar_hf import OsscarConfig, OsscarPruner

    with pytest.raises(OsscarConfigError, match=message):
        OsscarPruner(OsscarConfig(**fields))


def test_top_groups_with_partitions_keeps_the_best_of_every_partition():
    from osscar_hf.methods.base import top_groups

    scores = torch.tensor([9.0, 1.0, 2.0, 8.0, 7.0, 0.0])  # two partitions of three
    assert top_groups(scores, 2).tolist() == [0, 3]  # free: both from different partitions by chance
    assert top_groups(scores, 2, partitions=2).tolist() == [0, 3]
    assert top_groups(torch.tensor([9.0, 8.0, 2.0, 1.0, 7.0, 0.0]), 2, partitions=2).tolist() == [0, 4]
    assert top_groups(torch.tensor([9.0, 8.0, 2.0, 1.0, 7.0, 0.0]), 4, partitions=2).tolist() == [0, 1, 3, 4]
