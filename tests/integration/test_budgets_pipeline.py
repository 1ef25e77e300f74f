"""Budgets end to end: global sparsity met, explicit sizes and round_to honoured, per-block shapes saved and
reloaded, streaming equal to memory, a measured plan kept across a resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from osscar_hf import OsscarConfig, OsscarPruner, save_pruned
from osscar_hf.arch import get_spec
from osscar_hf.budgets import block_geometries
from osscar_hf.io import read_block_shapes
from osscar_hf.pipeline import BlockStream
from osscar_hf.streaming import PROGRESS_NAME, partial_folder
from tests.conftest import VOCAB, make_model

SMALL = dict(num_samples=8, seq_len=32, batch_size=4, device="cpu")
IDS = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def _prune(model, tokenizer, texts, **options):
    pruner = OsscarPruner(OsscarConfig(**{"dataset": texts, **SMALL, **options}))
    return pruner.prune(model, tokenizer, progress=False), pruner


def _block_cost(model, target: str = "params") -> float:
    spec = get_spec(model)
    return sum(g.cost(target, g.attention_structures, g.mlp_structures)
               for g in block_geometries(model, spec, seq_len=32))


def _kept_cost(dense, report, target: str = "params") -> float:
    spec = get_spec(dense)
    geometries = block_geometries(dense, spec, seq_len=32)
    return sum(g.cost(target, b.attention.kept, b.mlp.kept) for g, b in zip(geometries, report.blocks))


def test_explicit_sizes_are_pruned_to_exactly(tokenizer, calibration_texts):
    sizes = [{"attention": 2, "mlp": 40}, {"attention": 0, "mlp": 8}, {"attention": 1, "mlp": 48}]
    model, pruner = _prune(make_model("llama-gqa", num_hidden_layers=3), tokenizer, calibration_texts,
                           block_sizes=sizes)
    assert [(b.attention.kept, b.mlp.kept) for b in pruner.report.blocks] == [(2, 40), (0, 8), (1, 48)]
    assert [s["ffn_dim"] for s in read_block_shapes(model)] == [40, 8, 48]
    assert pruner.report.budget["allocation"] == "explicit"
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.parametrize("target", ["params", "flops"])
def test_a_uniform_budget_is_the_same_in_every_block(target, tokenizer, calibration_texts):
    dense = make_model("llama-gqa", num_hidden_layers=3)
    model, pruner = _prune(copy.deepcopy(dense), tokenizer, calibration_texts, sparsity=0.35, allocation="uniform",
                           sparsity_target=target)
    kept = {(b.attention.kept, b.mlp.kept) for b in pruner.report.blocks}
    assert len(kept) == 1
    geometry = block_geometries(dense, get_spec(dense), seq_len=32)[0]
    removed = 1 - _kept_cost(dense, pruner.report, target) / _block_cost(dense, target)
    assert abs(removed - 0.35) * _block_cost(dense, target) <= 3 * geometry.unit_costs(target)["mlp"] / 2 + 1e-6
    assert pruner.report.budget[f"block_{target}_removed"] == pytest.approx(removed)


def test_round_to_makes_every_neuron_count_a_multiple(tokenizer, calibration_texts):
    _, pruner = _prune(make_model("llama-gqa", num_hidden_layers=3), tokenizer, calibration_texts, sparsity=0.3,
                       method="flap", round_to=8)
    assert all(b.mlp.kept % 8 == 0 or b.mlp.kept == 48 for b in pruner.report.blocks)
    _, pruner = _prune(make_model("llama-gqa"), tokenizer, calibration_texts, attention_sparsity=0.5,
                       mlp_sparsity=0.3, round_to=16)
    assert [b.mlp.kept for b in pruner.report.blocks] == [32, 32]  # 34 kept neurons, rounded to 32


def test_flap_global_meets_the_budget_within_one_neuron(tokenizer, calibration_texts):
    dense = make_model("llama-gqa", num_hidden_layers=3)
    model, pruner = _prune(copy.deepcopy(dense), tokenizer, calibration_texts, sparsity=0.4, method="flap")
    geometry = block_geometries(model, get_spec(model), seq_len=32, with_biases=True)[0]
    before = pruner.report.budget["block_params_before"]
    after = pruner.report.budget["block_params_after"]
    assert 0 <= after - 0.6 * before < geometry.mlp_params or 0 <= 0.6 * before - after < geometry.mlp_params
    assert pruner.report.budget["allocation"] == "flap"


def test_per_block_shapes_save_and_reload_in_every_format(tmp_path, tokenizer, calibration_texts):
    sizes = [{"attention": 2, "mlp": 40}, {"attention": 1, "mlp": 8}]
    model, _ = _prune(make_model("llama-gqa"), tokenizer, calibration_texts, block_sizes=sizes)
    for fmt in ("osscar", "remote_code"):
        folder = save_pruned(model, tmp_path / fmt, format=fmt)
        loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=fmt == "remote_code",
                                                      attn_implementation="eager")
        assert [s["ffn_dim"] for s in read_block_shapes(loaded)] == [40, 8]
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert "osscar_block_shapes" in json.loads((tmp_path / "remote_code" / "config.json").read_text())


def test_a_measured_plan_is_kept_for_the_resume(tmp_path, tokenizer, calibration_texts, monkeypatch):
    from osscar_hf.pipeline import measure

    make_model("llama-gqa", num_hidden_layers=3).save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    tokenizer.save_pretrained(tmp_path / "dense")
    config = OsscarConfig(sparsity=0.4, method="flap", dataset=calibration_texts, **SMALL)
    reference = OsscarPruner(config).prune_checkpoint(tmp_path / "dense", tmp_path / "reference", progress=False)
    plans: list[int] = []
    real_measure, real_prune = measure.measured_sizes, BlockStream.prune
    monkeypatch.setattr(measure, "measured_sizes", lambda *a, **k: plans.append(1) or real_measure(*a, **k))

    def interrupt(self, index, block):
        if index == 1:
            raise KeyboardInterrupt
        return real_prune(self, index, block)

    monkeypatch.setattr(BlockStream, "prune", interrupt)
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        OsscarPruner(config).prune_checkpoint(tmp_path / "dense", target, progress=False)
    progress = json.loads((partial_folder(target.absolute()) / PROGRESS_NAME).read_text())
    assert len(progress["blocks"]) == 1 and len(progress["plan"]) == 3
    monkeypatch.setattr(BlockStream, "prune", real_prune)
    OsscarPruner(config).prune_checkpoint(tmp_path / "dense", target, progress=False)
    assert plans == [1]  # measured once; the resume read the plan back
    a = AutoModelForCausalLM.from_pretrained(reference)
    b = AutoModelForCausalLM.from_pretrained(target)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_stock_format_is_refused_for_a_global_allocation_before_any_work(tmp_path, tokenizer, calibration_texts):
    from osscar_hf.io.save import SaveError

    make_model("llama-gqa").save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    config = OsscarConfig(sparsity=0.4, method="flap", dataset=calibration_texts, **SMALL)
    with pytest.raises(SaveError, match="format='stock' cannot hold the per-block sizes a global allocation"):
        OsscarPruner(config).prune_checkpoint(tmp_path / "dense", tmp_path / "out", format="stock", progress=False)
    assert not (tmp_path / "out").exists()
