"""End to end on tiny random models: OsscarPruner.prune gives a smaller model that computes what the
masked dense model with the refit weights computes, and whose choices are reproducible."""

import copy
import sys

import pytest
import torch

from osscar_hf import OsscarConfig, OsscarPruner, magnitude_prune
from osscar_hf.arch import get_spec
from osscar_hf.capture import capture_block_inputs
from osscar_hf.config import keep_count
from osscar_hf.evaluation import count_parameters
from osscar_hf.io import pruning_record, read_block_shapes, stock_config_expresses
from osscar_hf.errors import CalibrationDataError, OsscarConfigError, UnsupportedModelError
from osscar_hf.surgery import group_channels
from tests.conftest import MODEL_KINDS, VOCAB, make_model

SMALL = dict(num_samples=8, seq_len=32, batch_size=4, device="cpu")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _prune(model, tokenizer, texts, **overrides):
    cfg = OsscarConfig(**{"attention_sparsity": 0.5, "mlp_sparsity": 0.5, "dataset": texts, **SMALL, **overrides})
    pruner = OsscarPruner(cfg)
    return pruner.prune(model, tokenizer, progress=False), pruner


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_prune_resizes_blocks_and_matches_masked_dense(kind, tokenizer, calibration_texts):
    dense = make_model(kind)
    original = copy.deepcopy(dense)
    spec = get_spec(dense)
    m, n_rep, hd = spec.group_geometry(dense.config)
    ffn = spec.ffn_dim(dense.config)
    pruned, pruner = _prune(dense, tokenizer, calibration_texts)
    report = pruner.report
    keep_g, keep_n = keep_count(m, 0.5), keep_count(ffn, 0.5)

    assert report.parameters_after < report.parameters_before
    assert report.parameters_after == count_parameters(pruned)
    shapes = [{"num_key_value_heads": keep_g, "num_attention_heads": keep_g * n_rep, "ffn_dim": keep_n}] * len(
        dense.get_submodule(spec.blocks))
    assert read_block_shapes(pruned) == shapes
    assert pruning_record(pruned).block_shapes == shapes
    assert spec.ffn_dim(pruned.config) == keep_n
    # Llama-family configs express uniform head counts (explicit head_dim): a plain config. OPT cannot, so
    # the per-block shapes travel in config.quantization_config.
    if spec.config_has_head_dim:
        assert stock_config_expresses(pruned.config, shapes)
        assert getattr(pruned.config, "quantization_config", None) is None
    else:
        assert pruned.config.quantization_config.block_shapes == shapes
        assert pruned.config.quantization_config.quant_method == "osscar"

    # The masked dense model: original weights, consumers replaced by the pruned model's refit columns.
    masked = copy.deepcopy(original)
    for b, (block, mblock) in enumerate(zip(pruned.get_submodule(spec.blocks), masked.get_submodule(spec.blocks))):
        rep = report.blocks[b]
        assert rep.attention.kept == keep_g and rep.mlp.kept == keep_n
        assert rep.attention.objective <= rep.attention.objective_stage_a + 1e-9 * abs(rep.attention.objective_stage_a)
        assert rep.mlp.objective <= rep.mlp.objective_stage_a + 1e-9 * abs(rep.mlp.objective_stage_a)
        assert 0.0 <= rep.mlp.relative_error < 1.0
        cols = group_channels(torch.tensor(rep.attention.kept_indices), n_rep * hd)
        neurons = torch.tensor(rep.mlp.kept_indices)
        for path, idx in ((f"{spec.attention}.{spec.o_proj}", cols), (spec.mlp_consumer, neurons)):
            full = torch.zeros_like(mblock.get_submodule(path).weight)
            full[:, idx] = block.get_submodule(path).weight.detach()
            with torch.no_grad():
                mblock.get_submodule(path).weight.copy_(full)
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, masked(ids).logits, rtol=1e-5, atol=1e-5)
    # With a KV cache: greedy generation past the sliding windows of the families that have one.
    out, reference = (model.generate(ids[:, :8], max_new_tokens=6, do_sample=False, pad_token_id=1,
                                     output_scores=True, return_dict_in_generate=True) for model in (pruned, masked))
    assert out.sequences.shape == (2, 14) and torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(reference.scores), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["opt", "llama-gqa"])
def test_sparsity_zero_is_bit_identical(kind, tokenizer, calibration_texts):
    model = make_model(kind)
    before, config_before = _state(model), model.config.to_dict()
    _, pruner = _prune(model, tokenizer, calibration_texts, attention_sparsity=0.0, mlp_sparsity=0.0)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.to_dict() == config_before
    assert not any(b.attention.solved or b.mlp.solved for b in pruner.report.blocks)


def test_same_seed_same_result(tokenizer, calibration_texts):
    a, _ = _prune(make_model("llama-gqa"), tokenizer, calibration_texts, seed=3)
    b, _ = _prune(make_model("llama-gqa"), tokenizer, calibration_texts, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["opt", "qwen2"])
def test_osscar_reconstructs_better_than_magnitude(kind, tokenizer, calibration_texts):
    dense = make_model(kind)
    ids = tokenizer(" ".join(calibration_texts[-3:]), return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        ref = dense(ids).logits
    osscar, _ = _prune(copy.deepcopy(dense), tokenizer, calibration_texts[:-3], attention_sparsity=0.5,
                       mlp_sparsity=0.5, num_samples=16)
    magnitude = magnitude_prune(copy.deepcopy(dense), attention_sparsity=0.5, mlp_sparsity=0.5)
    assert read_block_shapes(osscar) == read_block_shapes(magnitude)
    with torch.no_grad():
        err_osscar = (osscar(ids).logits - ref).pow(2).mean()
        err_magnitude = (magnitude(ids).logits - ref).pow(2).mean()
    assert err_osscar < 0.5 * err_magnitude


# propagate and dense_targets: what they change is checked in test_statistics_pipeline.py.
@pytest.mark.parametrize("options", [dict(local_search=False), dict(solver_dtype="float32"),
                                     dict(attention_sparsity=0.75, mlp_sparsity=0.9)])
def test_options_give_valid_models(options, tokenizer, calibration_texts):
    model, pruner = _prune(make_model("llama-gqa"), tokenizer, calibration_texts, **options)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert pruner.report.parameters_after < pruner.report.parameters_before


def test_report_json_round_trip(tmp_path, tokenizer, calibration_texts):
    import json

    _, pruner = _prune(make_model("opt"), tokenizer, calibration_texts)
    path = pruner.report.to_json(tmp_path / "sub" / "report.json")
    data = json.loads(path.read_text())
    assert data["model_type"] == "opt" and len(data["blocks"]) == 2
    assert data["blocks"][0]["attention"]["kept_indices"] == pruner.report.blocks[0].attention.kept_indices
    assert data["calibration"] == {"num_samples": 8, "seq_len": 32, "tokens": 256}
    if sys.platform.startswith("linux"):
        rss = [b["peak_host_rss_bytes"] for b in data["blocks"]]
        assert rss[0] > 10 * 2**20 and rss == sorted(rss)  # a process peak: at least the interpreter, never falls
    assert not list(tmp_path.glob("sub/.*.tmp"))


def test_capture_keeps_every_keyword_argument(tokenizer, calibration_texts):
    model = make_model("llama-gqa")
    blocks = model.get_submodule("model.layers")
    ids = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    captured = capture_block_inputs(model, blocks, ids, batch_size=2)
    assert [h.shape for h in captured.hidden] == [(2, 10, 32), (1, 10, 32)]
    assert len(captured.kwargs) == 2 and all(len(k) == 2 for k in captured.kwargs)
    kw = captured.kwargs[1][0]
    assert {"position_embeddings", "position_ids", "attention_mask"} <= set(kw)
    cos, sin = kw["position_embeddings"]
    assert cos.shape[-1] == 8
    # Blocks are back in place and untouched.
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in blocks)


# -- bad input: a clear error, the model untouched -------------------------------------------------------

def _assert_untouched(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert getattr(model.config, "quantization_config", None) is None
    assert pruning_record(model) is None


@pytest.mark.parametrize(
    "dataset,error,match",
    [
        ("/no/such/file.txt", CalibrationDataError, "/no/such/file.txt"),
        ([""], CalibrationDataError, "empty"),
        (["the state of the nation"], CalibrationDataError, "token"),
        (None, CalibrationDataError, "dataset"),
    ],
)
def test_bad_dataset_raises_and_leaves_model_untouched(dataset, error, match, tokenizer):
    model = make_model("opt")
    before = _state(model)
    pruner = OsscarPruner(OsscarConfig(attention_sparsity=0.5, mlp_sparsity=0.5, dataset=dataset, **SMALL))
    with pytest.raises(error, match=match):
        pruner.prune(model, tokenizer, progress=False)
    _assert_untouched(model, before)


def test_text_without_tokenizer_raises(calibration_texts):
    model = make_model("opt")
    before = _state(model)
    pruner = OsscarPruner(OsscarConfig(mlp_sparsity=0.5, dataset=calibration_texts, **SMALL))
    with pytest.raises(CalibrationDataError, match="tokenizer"):
        pruner.prune(model, None, progress=False)
    _assert_untouched(model, before)


@pytest.mark.parametrize("field,value", [("attention_sparsity", 1.0), ("mlp_sparsity", -0.1)])
def test_bad_sparsity_is_rejected_by_the_config(field, value):
    with pytest.raises(OsscarConfigError, match=field):
        OsscarConfig(**{field: value})


def test_unsupported_model_raises_and_is_untouched(tokenizer, calibration_texts):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB))
    before = _state(model)
    pruner = OsscarPruner(OsscarConfig(mlp_sparsity=0.5, dataset=calibration_texts, **SMALL))
    supported = "gemma, gemma2, gemma3, gemma3_text, gpt_neox, llama, mistral, mixtral, olmoe, opt, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe"
    with pytest.raises(UnsupportedModelError, match=f"supported model types: {supported}$"):
        pruner.prune(model, tokenizer, progress=False)
    _assert_untouched(model, before)


@pytest.mark.parametrize("kind", ["opt", "llama-gqa"])  # osscar-format config / plain config
def test_pruning_twice_is_refused(kind, tokenizer, calibration_texts):
    model, _ = _prune(make_model(kind), tokenizer, calibration_texts)
    before = _state(model)
    with pytest.raises(UnsupportedModelError, match="already pruned"):
        _prune(model, tokenizer, calibration_texts)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pruning_a_model_quantized_by_another_method_is_refused(tokenizer, calibration_texts):
    model = make_model("opt")
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(UnsupportedModelError, match="quantized with 'gptq'.*full-precision"):
        _prune(model, tokenizer, calibration_texts)


def test_token_ids_outside_vocabulary_are_refused():
    model = make_model("opt")
    before = _state(model)
    ids = torch.full((8, 32), VOCAB + 5, dtype=torch.long)
    pruner = OsscarPruner(OsscarConfig(mlp_sparsity=0.5, dataset=ids, **SMALL))
    with pytest.raises(CalibrationDataError, match="vocabulary"):
        pruner.prune(model, None, progress=False)
    _assert_untouched(model, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pruning_matches_cpu(tokenizer, calibration_texts):
    cpu, _ = _prune(make_model("llama-gqa"), tokenizer, calibration_texts)
    gpu, pruner = _prune(make_model("llama-gqa"), tokenizer, calibration_texts, device="cuda")
    assert next(gpu.parameters()).device.type == "cpu"  # blocks go back where they were
    assert read_block_shapes(gpu) == read_block_shapes(cpu)
    assert all(b.peak_device_memory_bytes for b in pruner.report.blocks)
    ids = torch.randint(3, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids).logits, cpu(ids).logits, rtol=1e-3, atol=1e-3)


def test_an_error_mid_loop_leaves_weights_and_config_consistent(monkeypatch, tokenizer, calibration_texts):
    import osscar_hf.methods.osscar as osscar_method
    from osscar_hf.errors import SolverError
    from osscar_hf.io.save import pruning_record

    real_solve, calls = osscar_method.solve_layer, []

    def failing_solve(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # block 0: attention, mlp; block 1: attention fails
            raise SolverError("injected failure")
        return real_solve(*args, **kwargs)

    monkeypatch.setattr(osscar_method, "solve_layer", failing_solve)
    model = make_model("opt")
    with pytest.raises(SolverError, match="injected"):
        _prune(model, tokenizer, calibration_texts)
    record = pruning_record(model)
    assert record is not None
    assert record.block_shapes[0]["ffn_dim"] == 24 and record.block_shapes[1]["ffn_dim"] == 48
    assert record.block_shapes[1]["num_attention_heads"] == 4
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("solver_dtype", ["float64", "float32"])
def test_the_solver_works_in_the_grams_own_storage(monkeypatch, tokenizer, calibration_texts, solver_dtype):
    """The Grams are accumulated in float32. The solve borrows the Gram as its p x p workspace: a float64 solve gets
    it converted, with the float32 one already released, so the p x p values are held once, not twice."""
    import weakref

    import osscar_hf.methods.osscar as osscar_method
    import osscar_hf.pipeline.statistics as statistics

    grams: list[weakref.ref] = []
    real_new_gram, real_solve = statistics.new_gram, osscar_method.solve_layer

    def new_gram(p, device="cpu"):
        H = real_new_gram(p, device)
        grams.append(weakref.ref(H))
        return H

    seen: list[tuple] = []

    def solve_layer(H, W_hat, **kwargs):
        live_float32 = [r() for r in grams if r() is not None and r().dtype == torch.float32 and r().shape == H.shape]
        borrowed_layout = H.stride(1) == 1 and H.stride(0) >= H.shape[0]
        seen.append((H.dtype, borrowed_layout, kwargs["in_place"], any(t is not H for t in live_float32)))
        return real_solve(H, W_hat, **kwargs)

    monkeypatch.setattr(statistics, "new_gram", new_gram)
    monkeypatch.setattr(osscar_method, "solve_layer", solve_layer)
    model = make_model("llama-gqa")
    _prune(model, tokenizer, calibration_texts, solver_dtype=solver_dtype)
    assert grams and len(seen) == 2 * model.config.num_hidden_layers
    assert set(seen) == {(getattr(torch, solver_dtype), True, True, False)}
