"""OSSCAR's allocation search (``OsscarConfig(allocation_search=N)``): budget-neutral exchanges from the curves'
plan, each candidate the model the pruning pass builds, kept when its held-out KL from the dense model is lower."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from osscar_hf import OsscarConfig, OsscarPruner
from osscar_hf.card import build_model_card
from osscar_hf.errors import OsscarConfigError
from tests.conftest import interrupt_at, make_model

SMALL = dict(num_samples=8, seq_len=32, batch_size=4, device="cpu", allocation_samples=4, local_search=False)
GLOBAL = dict(sparsity=0.35, min_part_keep=0.0)


def _spy(monkeypatch):
    """Record the runs the search sees (for their held-out windows) and the plans it starts from."""
    import osscar_hf.pipeline.measure as measure

    seen = {}
    real = measure.search_sizes

    def search(run, source, sizes, **kwargs):
        seen.update(run=run, plan=list(sizes))
        return real(run, source, sizes, **kwargs)

    monkeypatch.setattr(measure, "search_sizes", search)
    return seen


def _held_out_kl(dense, pruned, windows, stride):
    with torch.no_grad():
        p = F.log_softmax(dense(windows).logits[:, ::stride].float(), -1)
        q = F.log_softmax(pruned(windows).logits[:, ::stride].float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_the_search_evaluates_the_model_the_pruning_pass_builds(monkeypatch, tokenizer, calibration_texts):
    from osscar_hf.pipeline.search import SEARCH_POSITIONS

    seen = _spy(monkeypatch)
    model = make_model("llama-gqa", num_hidden_layers=3)
    dense = copy.deepcopy(model)
    pruner = OsscarPruner(OsscarConfig(dataset=calibration_texts, **SMALL, **GLOBAL, allocation_search=6))
    pruner.prune(model, tokenizer, progress=False)
    summary = pruner.report.budget["allocation_search"]
    assert summary["candidates"] == 6 and summary["kl_searched"] <= summary["kl_plan"]
    windows = seen["run"].held_out
    stride = max(1, -(-windows.numel() // SEARCH_POSITIONS))
    # The KL the search measured for its final plan is the pruned model's own: the candidates are built as the
    # pruning pass builds them.
    assert _held_out_kl(dense, model, windows, stride) == pytest.approx(summary["kl_searched"], rel=1e-4)
    budget = pruner.report.budget
    limit = (1 - 0.35) * budget["block_params_before"]
    neuron = 3 * model.config.hidden_size
    assert limit - neuron < budget["block_params_after"] <= limit
    card = str(build_model_card(pruner.report, base_model=None, config=pruner.config))
    assert f"refined by a search of 6 candidate exchanges between blocks evaluated as whole models " \
           f"({summary['accepted']} taken, the plan after {summary['chosen']} of them chosen" in card


def test_the_search_returns_the_plan_it_took_of_lowest_validation_kl(monkeypatch, tokenizer, calibration_texts):
    """Every fourth held-out window (3 and 7 of 8) is left out of the search's choices; of the plans it took (the
    curves' plan included) it returns the one of lowest KL on those windows."""
    from osscar_hf.pipeline.search import SEARCH_POSITIONS, _Search

    seen = _spy(monkeypatch)
    taken = []
    real_try = _Search.try_candidate

    segments = [[]]  # the candidates tried between two plans taken

    def record(self, sizes):
        if not taken:
            taken.append((self.kl, list(self.sizes)))  # the curves' plan
        segments[-1].append(tuple(sizes))
        accepted = real_try(self, sizes)
        if accepted:
            taken.append((self.kl, list(self.sizes)))
            segments.append([])
        return accepted

    monkeypatch.setattr(_Search, "try_candidate", record)
    model = make_model("llama-gqa", num_hidden_layers=3)
    dense = copy.deepcopy(model)
    fields = dict(SMALL, allocation_samples=8)
    pruner = OsscarPruner(OsscarConfig(dataset=calibration_texts, **fields, **GLOBAL, allocation_search=40))
    pruner.prune(model, tokenizer, progress=False)
    summary = pruner.report.budget["allocation_search"]
    assert len(taken) >= 3  # the plan and at least two taken candidates: a choice to make
    assert all(len(set(tried)) == len(tried) for tried in segments)  # a rejected candidate is not tried again
    best = min(range(len(taken)), key=lambda i: taken[i][0].validation)
    assert summary["chosen"] == best and summary["accepted"] == len(taken) - 1
    assert [[b.attention.kept, b.mlp.kept] for b in pruner.report.blocks] == \
        [[s.attention, s.mlp] for s in taken[best][1]]
    windows = seen["run"].held_out
    stride = max(1, -(-windows.numel() // SEARCH_POSITIONS))
    assert _held_out_kl(dense, model, windows[3::4], stride) == pytest.approx(summary["validation_kl_searched"],
                                                                             rel=1e-4)
    assert _held_out_kl(dense, model, windows, stride) == pytest.approx(summary["kl_searched"], rel=1e-4)


@pytest.mark.parametrize("samples, stages", [(8, 2), (4, 1)])
def test_a_candidate_not_better_on_the_first_stage_is_not_measured_further(monkeypatch, tokenizer, calibration_texts,
                                                                           samples, stages):
    """Racing: with two batches of held-out windows, a candidate is measured on the first batch (windows 0-3), and
    on the second only when its search KL on the first is lower than the plan's there; every plan taken was measured
    on both. With one batch there is one stage."""
    from osscar_hf.pipeline.search import _Search

    real_try, real_evaluate = _Search.try_candidate, _Search._evaluate
    trials = []  # per candidate: [(stage, candidate's KL sums of that stage's batches)], the plan's, accepted

    def evaluate(self, sizes, start, built, stage):
        totals, states = real_evaluate(self, sizes, start, built, stage)
        if trials:
            trials[-1][0].append((stage, totals.clone()))
        return totals, states

    def record(self, sizes):
        trials.append(([], self.totals.clone(), None))
        accepted = real_try(self, sizes)
        trials[-1] = trials[-1][:2] + (accepted,)
        return accepted

    monkeypatch.setattr(_Search, "_evaluate", evaluate)
    monkeypatch.setattr(_Search, "try_candidate", record)
    model = make_model("llama-gqa", num_hidden_layers=3)
    fields = dict(SMALL, allocation_samples=samples)
    pruner = OsscarPruner(OsscarConfig(dataset=calibration_texts, **fields, **GLOBAL, allocation_search=30))
    pruner.prune(model, tokenizer, progress=False)
    summary = pruner.report.budget["allocation_search"]
    early = [m for m, _, _ in trials if len(m) < stages]
    assert summary["rejected_early"] == len(early)
    for measured, plan, accepted in trials:
        first = measured[0][1]
        if stages == 2:  # the first stage measured windows 0-3 alone: nothing of the second stage's windows
            assert first[1].sum() == 0 and first[0, :, 1].sum() > 0
        first_lower = bool(first[0, 0, 0] < plan[0, 0, 0])
        assert [stage for stage, _ in measured] == (list(range(stages)) if first_lower or stages == 1 else [0])
        if accepted:
            whole = sum(totals for _, totals in measured)
            assert whole[:, 0, 0].sum() < plan[:, 0, 0].sum() and whole[:, :, 1].sum() == plan[:, :, 1].sum()
    if stages == 2:
        assert 0 < len(early) < len(trials) and summary["accepted"] > 0
    else:
        assert summary["rejected_early"] == 0


def test_a_search_that_only_overfits_gives_back_the_curves_plan(monkeypatch, tokenizer, calibration_texts):
    """When every plan the search takes is worse on the validation windows (here made so), the curves' plan is
    pruned."""
    from osscar_hf.pipeline.search import Divergence

    seen = _spy(monkeypatch)
    real_kl = Divergence.from_totals
    calls = []

    def worse_later(totals):
        kl = real_kl(totals)
        calls.append(1)
        return Divergence(kl.search, kl.validation + 10.0 * len(calls), kl.all)

    monkeypatch.setattr(Divergence, "from_totals", worse_later)
    model = make_model("llama-gqa", num_hidden_layers=3)
    fields = dict(SMALL, allocation_samples=8)
    pruner = OsscarPruner(OsscarConfig(dataset=calibration_texts, **fields, **GLOBAL, allocation_search=10))
    pruner.prune(model, tokenizer, progress=False)
    summary = pruner.report.budget["allocation_search"]
    assert summary["accepted"] > 0 and summary["chosen"] == 0
    assert summary["kl_searched"] == summary["kl_plan"]
    assert [[b.attention.kept, b.mlp.kept] for b in pruner.report.blocks] == \
        [[s.attention, s.mlp] for s in seen["plan"]]


def test_the_search_takes_the_neurons_of_a_redundant_block(monkeypatch, tokenizer, calibration_texts):
    """Started from the uniform plan on a model whose block 1 barely writes through its MLP, the search moves
    neurons away from that block, more than from the same block of the model as it was (without the search the plan
    stays uniform)."""
    import osscar_hf.pipeline.sensitivity as sensitivity

    def uniform_plan(config, geometries, damage):  # the planning runs, its curves are ignored
        return sensitivity.first_prune_sizes(config, geometries)

    monkeypatch.setattr(sensitivity, "global_sizes", uniform_plan)
    kept = {}
    for search, scale in ((0, 1e-3), (12, 1e-3), (12, 1.0)):
        model = make_model("llama-gqa", num_hidden_layers=3)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(scale)
        pruner = OsscarPruner(OsscarConfig(dataset=calibration_texts, **SMALL, **GLOBAL, allocation_search=search))
        pruner.prune(model, tokenizer, progress=False)
        kept[(search, scale)] = [b.mlp.kept for b in pruner.report.blocks]
    uniform = kept[(0, 1e-3)]
    assert len(set(uniform)) <= 2  # uniform (up to the rounding of the target)
    assert kept[(12, 1e-3)][1] < min(uniform) and kept[(12, 1e-3)][1] < kept[(12, 1.0)][1]


def test_a_streamed_search_writes_the_in_memory_model(tmp_path, tokenizer, calibration_texts):
    make_model("llama-gqa", num_hidden_layers=3).save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    tokenizer.save_pretrained(tmp_path / "dense")
    config = OsscarConfig(dataset=calibration_texts, **SMALL, **GLOBAL, allocation_search=4)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    pruner = OsscarPruner(config)
    pruner.prune(model, tokenizer, progress=False)
    streamer = OsscarPruner(config)
    folder = streamer.prune_checkpoint(tmp_path / "dense", tmp_path / "out", progress=False)
    searched = [r.budget["allocation_search"] for r in (pruner.report, streamer.report)]
    for key in ("candidates", "accepted", "kl_plan", "kl_searched"):
        assert searched[0][key] == pytest.approx(searched[1][key], rel=1e-6), key
    assert not any(p.name.startswith("planning") for p in folder.iterdir())
    streamed = AutoModelForCausalLM.from_pretrained(folder)
    sa, sb = model.state_dict(), streamed.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_resumed_streamed_search_reports_the_search_it_did_not_repeat(tmp_path, tokenizer, calibration_texts,
                                                                        monkeypatch):
    from osscar_hf.pipeline import measure
    from osscar_hf.pipeline.kept import KeptStatisticsStream

    make_model("llama-gqa", num_hidden_layers=3).save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    tokenizer.save_pretrained(tmp_path / "dense")
    config = OsscarConfig(dataset=calibration_texts, **SMALL, **GLOBAL, allocation_search=4)
    reference = OsscarPruner(config)
    reference.prune_checkpoint(tmp_path / "dense", tmp_path / "reference", progress=False)
    searches: list[int] = []
    real_search = measure.search_sizes
    monkeypatch.setattr(measure, "search_sizes", lambda *a, **k: searches.append(1) or real_search(*a, **k))
    real_prune = interrupt_at(monkeypatch, KeptStatisticsStream, "prune", 1)
    with pytest.raises(KeyboardInterrupt):
        OsscarPruner(config).prune_checkpoint(tmp_path / "dense", tmp_path / "out", progress=False)
    monkeypatch.setattr(KeptStatisticsStream, "prune", real_prune)
    resumed = OsscarPruner(config)
    resumed.prune_checkpoint(tmp_path / "dense", tmp_path / "out", progress=False)
    assert searches == [1]  # searched once; the resume read the plan and the search's summary back
    got, expected = resumed.report.budget["allocation_search"], reference.report.budget["allocation_search"]
    assert got.keys() == expected.keys() and got["seconds"] > 0
    for key in ("candidates", "accepted", "kl_plan", "kl_searched"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key
    assert "candidate exchanges between blocks" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("fields, words", [
    (dict(allocation_search=4), "needs sparsity"),
    (dict(sparsity=0.3, allocation="uniform", allocation_search=4), "allocation='uniform'"),
    (dict(sparsity=0.3, reuse_planning_grams=False, allocation_search=4), "reuse_planning_grams=False"),
    (dict(sparsity=0.3, allocation_search=-1), "allocation_search must be an int >= 0"),
    (dict(sparsity=0.3, allocation_search=2.5), "allocation_search must be an int >= 0"),
])
def test_bad_search_fields_are_refused_by_the_config(fields, words):
    with pytest.raises(OsscarConfigError, match=words):
        OsscarConfig(**fields)


@pytest.mark.parametrize("method", ["flap", "magnitude", "wanda_sp"])
def test_a_method_without_osscars_allocation_is_refused_before_any_work(method):
    with pytest.raises(OsscarConfigError, match="allocation_search=3"):
        OsscarPruner(OsscarConfig(sparsity=0.3, method=method, allocation_search=3))


def test_the_search_is_recorded_only_when_on():
    assert "allocation_search" not in OsscarConfig(sparsity=0.3).to_dict()
    assert OsscarConfig(sparsity=0.3, allocation_search=5).to_dict()["allocation_search"] == 5
