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
from tests.conftest import VOCAB, interrupt_at, make_model

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
    model, pruner = _prune(make_model("llama-gqa", num_hidden_layers=3), tokenizer, calibration_texts, sparsity=0.3,
                           method="flap", round_to=8)
    assert all(b.mlp.kept % 8 == 0 or b.mlp.kept == 48 for b in pruner.report.blocks)
    # FLAP ranks runs of 8 neurons: the budget is still met within one run, not one rounding per block
    geometry = block_geometries(model, get_spec(model), seq_len=32, with_biases=True)[0]
    budget = pruner.report.budget
    assert 0 <= 0.7 * budget["block_params_before"] - budget["block_params_after"] < 8 * geometry.mlp_params
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
    real_measure = measure.measured_sizes
    monkeypatch.setattr(measure, "measured_sizes", lambda *a, **k: plans.append(1) or real_measure(*a, **k))
    real_prune = interrupt_at(monkeypatch, BlockStream, "prune", 1)
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


# --------------------------------------------------------------------------- OSSCAR's global allocation
def _redundant(kind: str, block: int, layers: int = 4):
    """A model whose block ``block`` has its MLP output scaled near zero: that MLP barely matters."""
    model = make_model(kind, num_hidden_layers=layers)
    spec = get_spec(model)
    with torch.no_grad():
        model.get_submodule(spec.blocks)[block].get_submodule(spec.mlp_consumer).weight.mul_(1e-3)
    return model


@pytest.mark.parametrize("kind", ["llama-gqa", "opt"])
def test_a_redundant_block_is_pruned_hardest(kind, tokenizer, calibration_texts):
    model = _redundant(kind, block=2)
    _, pruner = _prune(model, tokenizer, calibration_texts, sparsity=0.3, min_part_keep=0.0, min_block_keep=0.0,
                       num_samples=16, allocation_samples=4)
    mlp = [b.mlp.kept for b in pruner.report.blocks]
    assert mlp[2] == min(mlp) and mlp[2] < sorted(mlp)[1]  # strictly the hardest
    assert pruner.report.budget["allocation"] == "osscar"


@pytest.mark.parametrize("target", ["params", "flops"])
def test_osscar_global_meets_the_budget_within_one_neuron(target, tokenizer, calibration_texts):
    dense = make_model("llama-gqa", num_hidden_layers=4)
    model, pruner = _prune(copy.deepcopy(dense), tokenizer, calibration_texts, sparsity=0.45, sparsity_target=target,
                           allocation_samples=4)
    geometry = block_geometries(dense, get_spec(dense), seq_len=32)[0]
    kept, total = _kept_cost(dense, pruner.report, target), _block_cost(dense, target)
    assert 0 <= (1 - 0.45) * total - kept < geometry.unit_costs(target)["mlp"] + 1e-6
    assert len({(b.attention.kept, b.mlp.kept) for b in pruner.report.blocks}) > 1  # sizes chosen per block
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_osscar_global_honours_round_to_and_the_floors(tokenizer, calibration_texts):
    _, pruner = _prune(make_model("llama-gqa", num_hidden_layers=4), tokenizer, calibration_texts, sparsity=0.5,
                       round_to=8, min_part_keep=0.25, allocation_samples=4)
    for b in pruner.report.blocks:
        assert b.mlp.kept % 8 == 0 or b.mlp.kept == 48
        assert b.mlp.kept >= 16 and b.attention.kept >= 1  # 25% of 48 neurons rounded up to 8s; of 2 KV groups


@pytest.mark.parametrize("kind", ["llama-gqa", "gemma2"])  # gemma2: the allocation's loss through the logit cap
def test_osscar_global_streams_to_what_memory_gives(kind, tmp_path, tokenizer, calibration_texts):
    dense = _redundant(kind, block=1, layers=3)
    dense.save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    tokenizer.save_pretrained(tmp_path / "dense")
    config = OsscarConfig(sparsity=0.4, dataset=calibration_texts, allocation_samples=4, **SMALL)
    memory_pruner = OsscarPruner(config)
    memory = memory_pruner.prune(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), tokenizer,
                                 progress=False)
    streaming_pruner = OsscarPruner(config)
    folder = streaming_pruner.prune_checkpoint(tmp_path / "dense", tmp_path / "out", progress=False)
    assert [(b.attention.kept, b.mlp.kept) for b in streaming_pruner.report.blocks] == [
        (b.attention.kept, b.mlp.kept) for b in memory_pruner.report.blocks]
    streamed = AutoModelForCausalLM.from_pretrained(folder)
    sa, sb = memory.state_dict(), streamed.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not (folder / "planning").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["osscar", "flap"])
def test_a_global_allocation_on_cuda_matches_cpu(method, tokenizer, calibration_texts):
    dense = make_model("llama-gqa", num_hidden_layers=4)
    options = dict(sparsity=0.3, allocation="global", method=method)
    cpu, cpu_pruner = _prune(copy.deepcopy(dense), tokenizer, calibration_texts, **options)
    gpu, gpu_pruner = _prune(copy.deepcopy(dense), tokenizer, calibration_texts, **{**options, "device": "cuda"})
    assert next(gpu.parameters()).device.type == "cpu"  # blocks go back where they were
    sizes = [[(b.attention.kept, b.mlp.kept) for b in p.report.blocks] for p in (cpu_pruner, gpu_pruner)]
    assert sizes[0] == sizes[1]
    with torch.no_grad():
        torch.testing.assert_close(gpu(IDS).logits, cpu(IDS).logits, rtol=2e-3, atol=2e-3)


def test_the_plan_counts_in_the_activation_space_and_releases_its_windows(tmp_path, tokenizer, calibration_texts):
    import math

    from osscar_hf.pipeline import InMemoryBlocks, activation_space, capture, plan_sizes, start_run

    model = make_model("llama-gqa", num_hidden_layers=3)
    spec = get_spec(model)
    config = OsscarConfig(sparsity=0.3, dataset=calibration_texts, allocation_samples=4, activation_storage="disk",
                          activation_dir=str(tmp_path), **{**SMALL, "num_samples": 8})
    pruner = OsscarPruner(config)
    run = start_run(config, model, spec, lambda held: pruner.calibration_window_sets(model, tokenizer, held_out=held))
    space = activation_space(run)
    assert space.streams == 3 + math.ceil(4 * 4 / 8)  # the first prune's streams and 4 blocks' held-out inputs
    with space, torch.no_grad():
        captured = capture(run, space)
        captured_bytes = space.bytes_on_disk  # 8 calibration windows and 4 held-out ones
        assert run.held_out_inputs is not None and captured_bytes > 0
        plan_sizes(run, InMemoryBlocks(), captured, progress=False)
        assert run.held_out_inputs is None and run.settings.sizes
        # Every planning store is gone, the held-out inputs too: only the 8 calibration windows' inputs stay.
        assert space.bytes_on_disk * 12 == captured_bytes * 8

    uniform = OsscarConfig(sparsity=0.3, allocation="uniform", dataset=calibration_texts, **SMALL)
    run = start_run(uniform, model, spec, lambda held: pruner.calibration_window_sets(model, tokenizer, held_out=held))
    assert activation_space(run).streams == 2

