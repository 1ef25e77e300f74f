"""Mixtures of experts (Mixtral, Qwen3-MoE, Qwen2-MoE with its shared expert; transformers 5's fused experts): each
family's proof on a tiny random model of 4 experts of 32 neurons, 2 per token (and a shared expert of 48). Pruned logits equal the masked dense model's (each expert's pruned
neurons zeroed in its down projection; with and without a KV cache), every format reloads bit-exactly (stock for
uniform shapes, osscar, remote code; also per-block shapes with query heads), a streamed run writes the in-memory
result under the checkpoint's per-expert names; every expert's Gram is accumulated over its routed tokens only,
scaled by their routing weights; an expert without a token keeps its largest neurons unchanged, with a log line;
what a mixture of experts cannot take is refused before any data is read."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import osscar_hf  # noqa: F401 - registers the osscar quantizer
from osscar_hf import OsscarConfig, OsscarConfigError, OsscarPruner, UnsupportedModelError, save_pruned
from osscar_hf.arch import get_spec
from osscar_hf.io import read_block_shapes
from osscar_hf.pipeline import BlockStream
from osscar_hf.pipeline.statistics import ExpertStatistics, InputStatistics, gated_input_hooks, routed_input_hooks
from osscar_hf.pruner import check_prunable_config
from tests.conftest import MOE_KINDS, make_model
from tests.equivalence import (SMALL, assert_reloads_bit_exactly, generate, load, logits, masked_dense,
                             pruned_both_ways, tensor_names)

@pytest.fixture(scope="module", params=MOE_KINDS)
def runs(request, tmp_path_factory, tokenizer, calibration_texts):
    """The dense model, the same pruned in memory (half the KV groups, half of every expert's neurons) and by a
    streamed run."""
    kind = request.param
    return kind, *pruned_both_ways(kind, tmp_path_factory.mktemp(kind), tokenizer, calibration_texts)


def test_pruned_logits_are_the_masked_dense_models(runs):
    kind, dense, model, report, _ = runs
    experts = model.model.layers[0].mlp.experts
    shape = {"num_key_value_heads": 1, "num_attention_heads": 2, "ffn_dim": 16}
    if kind == "qwen2_moe":  # the shared expert keeps the routed experts' fraction: 24 of its 48 neurons
        shape["shared_ffn_dim"] = 24
        shared = model.model.layers[0].mlp.shared_expert
        assert tuple(shared.gate_proj.weight.shape) == (24, 32) and shared.intermediate_size == 24
        entry = report.blocks[0].shared_expert
        assert (entry.structures, entry.kept, entry.solved) == (48, 24, True)
    else:
        assert report.blocks[0].shared_expert is None
    assert read_block_shapes(model) == [shape] * 2
    assert tuple(experts.gate_up_proj.shape) == (4, 32, 32) and experts.intermediate_dim == 16
    mlp = report.blocks[0].mlp
    assert (mlp.structures, mlp.kept, mlp.experts, mlp.kept_per_expert) == (128, 64, 4, 16)
    masked = masked_dense(dense, model, report)
    torch.testing.assert_close(logits(model), logits(masked), rtol=1e-5, atol=1e-5)
    out, reference = generate(model), generate(masked)  # with a KV cache
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(reference.scores), rtol=1e-5, atol=1e-5)


def test_streamed_equals_in_memory_and_every_format_reloads_bit_exactly(runs, tmp_path, tokenizer):
    kind, dense, model, _, streamed = runs
    assert_reloads_bit_exactly(model, load(streamed, model))
    saved = save_pruned(model, tmp_path / "auto", tokenizer=tokenizer)
    data = json.loads((saved / "config.json").read_text())
    assert data == json.loads((streamed / "config.json").read_text())
    assert "quantization_config" not in data  # uniform: a stock checkpoint, the one intermediate size halved
    assert data[get_spec(model).config_ffn] == 16 and data["num_key_value_heads"] == 1
    assert data.get("shared_expert_intermediate_size") == (24 if kind == "qwen2_moe" else None)
    names = tensor_names(saved)
    assert names == tensor_names(streamed) and names == tensor_names(streamed.parent / "dense")  # per expert
    assert_reloads_bit_exactly(model, load(saved, model))
    for fmt, kwargs in (("osscar", {}), ("remote_code", {"trust_remote_code": True})):
        assert_reloads_bit_exactly(model, load(save_pruned(model, tmp_path / fmt, format=fmt), model, **kwargs))


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_per_block_sizes_with_query_heads_in_osscar_and_remote_code(kind, tmp_path, tokenizer, calibration_texts):
    """Per-block sizes (Qwen3-MoE's formats are proved above with uniform sizes); a shared expert's width follows
    each block's routed experts."""
    dense = make_model(kind)
    pruner = OsscarPruner(OsscarConfig(block_sizes=[{"attention": 1, "mlp": 8}, {"attention": 2, "mlp": 24}],
                                       attention_structure="query_heads", method="obs_greedy",
                                       dataset=calibration_texts, **SMALL))
    model = pruner.prune(copy.deepcopy(dense), tokenizer, progress=False)
    assert [s["ffn_dim"] for s in read_block_shapes(model)] == [8, 24]
    assert [s.get("shared_ffn_dim") for s in read_block_shapes(model)] == ([16, 32] if kind == "qwen2_moe"
                                                                             else [None, None])
    assert model.model.layers[0].self_attn.o_proj.in_features == 2 * get_spec(model).head_dim(dense.config)
    torch.testing.assert_close(logits(model), logits(masked_dense(dense, model, pruner.report)), rtol=1e-5, atol=1e-5)
    for fmt, kwargs in (("osscar", {}), ("remote_code", {"trust_remote_code": True})):
        assert_reloads_bit_exactly(model, load(save_pruned(model, tmp_path / fmt, format=fmt), model, **kwargs))


@pytest.mark.parametrize("method", ["magnitude", "wanda_sp"])
def test_score_methods_keep_the_same_count_per_expert_and_the_weights(method, tokenizer, calibration_texts):
    dense = make_model("mixtral")
    pruner = OsscarPruner(OsscarConfig(sparsity=0.3, allocation="uniform", method=method,
                                       dataset=calibration_texts, **SMALL))
    model = pruner.prune(copy.deepcopy(dense), tokenizer, progress=False)
    for b, block in enumerate(model.model.layers):
        down, dense_down = block.mlp.experts.down_proj, dense.model.layers[b].mlp.experts.down_proj
        kept = torch.tensor(pruner.report.blocks[b].mlp.kept_indices).reshape(4, -1) % 32
        assert kept.shape[1] == 24  # 70% of 32, rounded to a multiple of 8 (grouped_mm's alignment)
        assert all(torch.equal(down[e], dense_down[e][:, kept[e]]) for e in range(4))  # no refit
    torch.testing.assert_close(logits(model), logits(masked_dense(dense, model, pruner.report)), rtol=1e-5, atol=1e-5)


def test_each_experts_gram_is_over_its_routed_tokens_scaled_by_their_weights():
    model = make_model("qwen3_moe")
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(1))
    stats = ExpertStatistics(4, 32, torch.device("cpu"), frozenset({"gram", "moments"}))
    with torch.no_grad(), routed_input_hooks({"mlp": (mlp.experts, "gate_up_proj")},
                                             lambda n, e, h: stats.add(e, h)):
        mlp(x)
        _, weights, index = mlp.gate(x.reshape(-1, 32))
    for e in range(4):
        token, position = torch.where(index == e)
        gate, up = F.linear(x[0, token], mlp.experts.gate_up_proj[e].detach()).chunk(2, dim=-1)
        inputs = F.silu(gate) * up * weights[token, position, None]
        got = stats.take(e)
        assert got.tokens == token.numel() > 0
        torch.testing.assert_close(got.gram.double(), (inputs.T @ inputs).double() / token.numel(), rtol=1e-4,
                                   atol=1e-7)
        torch.testing.assert_close(got.mean, inputs.double().mean(0), rtol=1e-4, atol=1e-7)


def test_the_shared_experts_gram_scales_every_token_by_its_gate():
    model = make_model("qwen2_moe")
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(1))
    stats = InputStatistics(48, torch.device("cpu"), frozenset({"gram"}), False)
    with torch.no_grad(), gated_input_hooks({"shared": (mlp.shared_expert.down_proj, mlp.shared_expert_gate)},
                                            lambda n, h: stats.add(h)):
        mlp(x)
        h, shared = x[0], mlp.shared_expert
        inputs = F.silu(shared.gate_proj(h)) * shared.up_proj(h) * torch.sigmoid(mlp.shared_expert_gate(h))
    got = stats.take()
    assert got.tokens == 24
    torch.testing.assert_close(got.gram.double(), (inputs.T @ inputs).double() / 24, rtol=1e-4, atol=1e-7)


def test_the_pipeline_gives_the_shared_expert_its_gated_inputs(monkeypatch, tokenizer, calibration_texts):
    """Every block's shared expert is solved on its down projection's inputs scaled by its own gate."""
    from osscar_hf.pipeline import block as block_module

    hooked, real = [], block_module.gated_input_hooks

    def spy(modules, callback):
        hooked.append({name: pair for name, pair in modules.items()})
        return real(modules, callback)

    monkeypatch.setattr(block_module, "gated_input_hooks", spy)
    model = make_model("qwen2_moe")
    pruner = OsscarPruner(OsscarConfig(mlp_sparsity=0.5, dataset=calibration_texts, **SMALL))
    pruner.prune(model, tokenizer, progress=False)
    batches = len(hooked) // 2
    assert batches > 0 and len(hooked) == 2 * batches
    for b, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        for modules in hooked[b * batches:(b + 1) * batches]:
            assert list(modules) == ["shared_expert"]
            assert modules["shared_expert"][0] is mlp.shared_expert.down_proj
            assert modules["shared_expert"][1] is mlp.shared_expert_gate
    assert all(b.shared_expert.solved and b.shared_expert.relative_error is not None for b in pruner.report.blocks)


def _never_route_to_expert_3(module, args):
    hidden, index, weights = args
    return hidden, torch.where(index == 3, torch.zeros_like(index), index), weights


def test_an_expert_without_tokens_keeps_its_largest_neurons_unchanged(caplog, tokenizer, calibration_texts):
    dense = make_model("mixtral")
    for layer in dense.model.layers:
        layer.mlp.experts.register_forward_pre_hook(_never_route_to_expert_3)
    pruner = OsscarPruner(OsscarConfig(mlp_sparsity=0.5, dataset=calibration_texts, **SMALL))
    with caplog.at_level(logging.INFO, logger="osscar_hf"):
        model = pruner.prune(copy.deepcopy(dense), tokenizer, progress=False)
    assert "block 0 expert 3: no calibration token routed to it" in caplog.text
    assert "block 1 expert 3: no calibration token" in caplog.text and "expert 2: no" not in caplog.text
    dense_down, down = dense.model.layers[0].mlp.experts.down_proj, model.model.layers[0].mlp.experts.down_proj
    kept = torch.tensor(pruner.report.blocks[0].mlp.kept_indices).reshape(4, -1) % 32
    assert torch.equal(kept[3], dense_down[3].norm(dim=0).topk(16).indices.sort().values)  # by magnitude
    assert torch.equal(down[3], dense_down[3][:, kept[3]])  # not refit
    assert not torch.equal(down[0], dense_down[0][:, kept[0]])  # refit


def test_few_tokens_raise_the_damping_with_a_log_line(caplog, tokenizer, calibration_texts):
    config = dict(SMALL, num_samples=1, seq_len=8, batch_size=1)  # 8 tokens, 2 experts each: fewer than 32 neurons
    pruner = OsscarPruner(OsscarConfig(mlp_sparsity=0.5, dataset=calibration_texts, **config))
    with caplog.at_level(logging.INFO, logger="osscar_hf"):
        pruner.prune(make_model("mixtral"), tokenizer, progress=False)
    assert "calibration tokens for 32 neurons; damping x10" in caplog.text


@pytest.mark.parametrize("fields, match", [
    (dict(method="flap", mlp_sparsity=0.5), "method='flap'.*use method='wanda_sp'"),
    (dict(dense_targets=True, mlp_sparsity=0.5), "dense_targets=True.*dense_targets=False"),
    (dict(sparsity=0.3), "allocation='auto' with sparsity=.*global allocation.*allocation='uniform'"),
    (dict(sparsity=0.3, allocation='global', method='obs_greedy'), "allocation='global'.*allocation='uniform'"),
    (dict(block_sizes=[{"attention": 2, "mlp": 12}] * 2), r"block_sizes\[0\]\['mlp'\] = 12.*multiple of 8"),
])
def test_what_experts_cannot_take_is_refused_before_any_data_is_read(fields, match):
    def no_data(*args, **kwargs):
        raise AssertionError("data was read")

    pruner = OsscarPruner(OsscarConfig(dataset=["unused"], **dict(SMALL, **fields)))
    pruner.calibration_window_sets = no_data
    with pytest.raises(OsscarConfigError, match=match):
        pruner.prune(make_model("mixtral"), progress=False)


@pytest.mark.parametrize("fields", [dict(mlp_only_layers=[1]), dict(decoder_sparse_step=2)])
def test_qwen3_moe_with_dense_mlp_layers_is_refused_naming_the_fields(fields, tmp_path):
    model = make_model("qwen3_moe", **fields)
    match = r"every layer has experts.*this config has mlp_only_layers=.*, decoder_sparse_step="
    with pytest.raises(UnsupportedModelError, match=match):
        check_prunable_config(model.config)  # config.json alone (the CLI's check before loading)
    with pytest.raises(UnsupportedModelError, match=match):
        OsscarPruner(OsscarConfig(mlp_sparsity=0.5, dataset=["unused"], **SMALL)).prune(model, progress=False)
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(UnsupportedModelError, match=match):
        OsscarPruner(OsscarConfig(mlp_sparsity=0.5, dataset=["unused"], **SMALL)).prune_checkpoint(
            tmp_path / "dense", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_an_interrupted_streamed_run_resumes_with_identical_output(kind, tmp_path, tokenizer, calibration_texts,
                                                                   monkeypatch):
    """The finished block is replayed at its per-expert size (the report's kept_per_expert, and its shared expert's
    width), not solved again."""
    make_model(kind).save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    tokenizer.save_pretrained(tmp_path / "dense")
    config = OsscarConfig(block_sizes=[{"attention": 1, "mlp": 8}, {"attention": 2, "mlp": 24}],
                          dataset=calibration_texts, **SMALL)
    reference = OsscarPruner(config).prune_checkpoint(tmp_path / "dense", tmp_path / "reference", progress=False)
    real, solved = BlockStream.prune, []

    def prune(self, index, module):
        if index == 1 and "resumed" not in solved:
            raise KeyboardInterrupt
        solved.append(index)
        return real(self, index, module)

    monkeypatch.setattr(BlockStream, "prune", prune)
    with pytest.raises(KeyboardInterrupt):
        OsscarPruner(config).prune_checkpoint(tmp_path / "dense", tmp_path / "out", progress=False)
    solved.clear()
    solved.append("resumed")
    OsscarPruner(config).prune_checkpoint(tmp_path / "dense", tmp_path / "out", progress=False)
    assert solved == ["resumed", 1]  # block 0 was not solved again
    a, b = _tensors(reference), _tensors(tmp_path / "out")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "out" / "config.json").read_text() == (reference / "config.json").read_text()


def test_a_spec_naming_a_shared_expert_the_model_lacks_is_refused():
    import dataclasses

    from osscar_hf.arch.experts import SharedExpert

    model = make_model("qwen3_moe")  # no shared expert
    spec = get_spec(model)
    wrong = dataclasses.replace(spec, experts=dataclasses.replace(spec.experts, shared=SharedExpert()))
    with pytest.raises(UnsupportedModelError, match=r"lacks .*nn.Linear at model.layers.0.mlp.shared_expert.gate_proj"):
        wrong.check_model(model)
    assert SharedExpert(producers=()).problems() == [
        "experts.shared.producers must be a non-empty tuple of str, got ()"]


def test_olmoe_prunes_its_experts_and_keeps_its_attention(tmp_path, tokenizer, calibration_texts):
    """OLMoE's q/k norms span whole projections: its MLP is pruned like Qwen3-MoE's, its attention stays bit-equal,
    and a budget given as sparsity= is spent on the MLP alone."""
    make_model("olmoe").save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    tokenizer.save_pretrained(tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    config = dict(mlp_sparsity=0.5, dataset=calibration_texts, **SMALL)
    pruner = OsscarPruner(OsscarConfig(**config))
    model = pruner.prune(copy.deepcopy(dense), tokenizer, progress=False)
    assert read_block_shapes(model) == [{"num_key_value_heads": 2, "num_attention_heads": 4, "ffn_dim": 16}] * 2
    for b, block in enumerate(model.model.layers):
        for name, p in block.self_attn.named_parameters():
            assert torch.equal(p, dense.model.layers[b].self_attn.get_parameter(name)), name
    torch.testing.assert_close(logits(model), logits(masked_dense(dense, model, pruner.report)), rtol=1e-5, atol=1e-5)
    streamed = OsscarPruner(OsscarConfig(**config)).prune_checkpoint(tmp_path / "dense", tmp_path / "streamed",
                                                                     progress=False)
    assert_reloads_bit_exactly(model, load(streamed, model))
    saved = save_pruned(model, tmp_path / "stock", tokenizer=tokenizer)
    assert json.loads((saved / "config.json").read_text())["intermediate_size"] == 16
    assert tensor_names(saved) == tensor_names(tmp_path / "dense")  # per expert, as the checkpoint stores them
    assert_reloads_bit_exactly(model, load(saved, model))
    for fmt, kwargs in (("osscar", {}), ("remote_code", {"trust_remote_code": True})):
        assert_reloads_bit_exactly(model, load(save_pruned(model, tmp_path / fmt, format=fmt), model, **kwargs))
    budget = OsscarPruner(OsscarConfig(sparsity=0.4, allocation="uniform", dataset=calibration_texts, **SMALL))
    budget.prune(make_model("olmoe"), tokenizer, progress=False)
    assert all((b.attention.kept, b.mlp.kept_per_expert) == (2, 16) for b in budget.report.blocks)


@pytest.mark.parametrize("fields, asked", [
    (dict(attention_sparsity=0.5), "attention_sparsity=0.5"),
    (dict(mlp_sparsity=0.5, attention_structure="query_heads"), "attention_structure='query_heads'"),
    (dict(block_sizes=[{"attention": 2, "mlp": 16}, {"attention": 1, "mlp": 16}]),
     r"block_sizes\[1\]\['attention'\] = 1"),
])
def test_olmoe_attention_pruning_is_refused_with_the_reason(fields, asked):
    def no_data(*args, **kwargs):
        raise AssertionError("data was read")

    model = make_model("olmoe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = OsscarPruner(OsscarConfig(dataset=["unused"], **dict(SMALL, **fields)))
    pruner.calibration_window_sets = no_data
    with pytest.raises(OsscarConfigError, match=f"{asked}: the attention of spec 'olmoe' cannot be pruned "
                                                r"\(its q/k norms .*attention_sparsity=0, block_sizes with "
                                                "'attention': 2"):
        pruner.prune(model, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
