"""Every pruning method through the one pipeline: in memory, streamed, saved and reloaded; bias compensation."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from osscar_hf import OsscarConfig, OsscarPruner, save_pruned
from osscar_hf.arch import get_spec
from osscar_hf.errors import CalibrationDataError, UnsupportedModelError
from osscar_hf.io import read_block_shapes
from osscar_hf.methods import method_names
from osscar_hf.surgery import add_part_biases, group_channels
from tests.conftest import VOCAB, make_model

SMALL = dict(num_samples=8, seq_len=32, batch_size=4, device="cpu")
IDS = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
METHODS = ["osscar", "obs_greedy", "magnitude", "wanda_sp", "flap"]


def _config(texts, **overrides) -> OsscarConfig:
    return OsscarConfig(**{"attention_sparsity": 0.5, "mlp_sparsity": 0.5, "dataset": texts, **SMALL, **overrides})


def _masked(original, pruned, report, with_biases: bool):
    """The dense model with the pruned structures' consumer columns zeroed, the kept ones replaced by the pruned
    model's, and (bias compensation) the pruned model's consumer biases."""
    spec = get_spec(original)
    m, n_rep, head_dim = spec.group_geometry(original.config)
    masked = copy.deepcopy(original)
    for b, (block, mblock) in enumerate(zip(pruned.get_submodule(spec.blocks), masked.get_submodule(spec.blocks))):
        if with_biases:
            add_part_biases(mblock, spec)
        rep = report.blocks[b]
        columns = group_channels(torch.tensor(rep.attention.kept_indices, dtype=torch.int64), n_rep * head_dim)
        neurons = torch.tensor(rep.mlp.kept_indices, dtype=torch.int64)
        for path, idx in ((f"{spec.attention}.{spec.o_proj}", columns), (spec.mlp_consumer, neurons)):
            source, target = block.get_submodule(path), mblock.get_submodule(path)
            full = torch.zeros_like(target.weight)
            full[:, idx] = source.weight.detach()
            with torch.no_grad():
                target.weight.copy_(full)
                if source.bias is not None:
                    target.bias.copy_(source.bias)
    return masked


@pytest.mark.parametrize("kind", ["opt", "llama-gqa"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_the_masked_dense_model(method, kind, tokenizer, calibration_texts):
    original = make_model(kind)
    pruner = OsscarPruner(_config(calibration_texts, method=method))
    pruned = pruner.prune(copy.deepcopy(original), tokenizer, progress=False)
    spec = get_spec(original)
    m, n_rep, _ = spec.group_geometry(original.config)
    assert read_block_shapes(pruned) == [{"num_key_value_heads": m // 2, "num_attention_heads": m // 2 * n_rep,
                                          "ffn_dim": 24}] * 2
    assert pruner.report.budget["method"] == method
    masked = _masked(original, pruned, pruner.report, with_biases=method == "flap")
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, masked(IDS).logits, rtol=1e-5, atol=1e-5)
        assert pruned.generate(IDS[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=1).shape == (2, 8)


def test_methods_differ_and_the_refitting_ones_fit_best(tokenizer, calibration_texts):
    original = make_model("opt")
    ids = tokenizer(" ".join(calibration_texts[-3:]), return_tensors="pt").input_ids[:, :64]  # held out
    with torch.no_grad():
        reference = original(ids).logits
    errors, kept = {}, {}
    for method in METHODS:
        pruner = OsscarPruner(_config(calibration_texts[:-3], method=method, num_samples=16))
        model = pruner.prune(copy.deepcopy(original), tokenizer, progress=False)
        with torch.no_grad():
            errors[method] = float((model(ids).logits - reference).pow(2).mean())
        kept[method] = [b.mlp.kept_indices for b in pruner.report.blocks]
    assert len({str(v) for v in kept.values()}) >= 3  # the methods choose differently
    assert max(errors["osscar"], errors["obs_greedy"]) < min(errors["magnitude"], errors["wanda_sp"])


def test_magnitude_reads_no_calibration_data_and_the_others_need_it(tokenizer):
    model = make_model("llama-gqa")
    pruner = OsscarPruner(OsscarConfig(0.5, 0.5, method="magnitude", device="cpu"))
    pruner.prune(model, progress=False)
    assert pruner.report.calibration["tokens"] == 0 and read_block_shapes(model)[0]["ffn_dim"] == 24
    before = {k: v.clone() for k, v in make_model("llama-gqa").state_dict().items()}
    fresh = make_model("llama-gqa")
    with pytest.raises(CalibrationDataError, match="OsscarConfig.dataset is required"):
        OsscarPruner(OsscarConfig(0.5, 0.5, method="wanda_sp", device="cpu")).prune(fresh, tokenizer)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # untouched


def test_flap_biases_make_a_stock_llama_checkpoint(tmp_path, tokenizer, calibration_texts):
    pruner = OsscarPruner(_config(calibration_texts, method="flap"))
    model = pruner.prune(make_model("llama-gqa"), tokenizer, progress=False)
    assert model.config.attention_bias and model.config.mlp_bias
    assert save_pruned(model, tmp_path / "out", format="stock") is not None
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert getattr(loaded.config, "quantization_config", None) is None
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


# Mistral has no bias switch; Qwen3 and Gemma switch the attention's biases on (attention_bias) but not the MLP's.
@pytest.mark.parametrize("kind,part", [("mistral", "attention"), ("gemma", "mlp")])
def test_flap_on_a_family_that_cannot_hold_biases_is_refused_before_any_work(kind, part, tokenizer,
                                                                              calibration_texts):
    model = make_model(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=f"method 'flap' gives the {part} output projection a bias, "
                                                    f"but model_type '{kind}' has no config field"):
        OsscarPruner(_config(calibration_texts, method="flap")).prune(model, tokenizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_every_registered_method_is_covered():
    assert set(METHODS) == set(method_names())


@pytest.mark.parametrize("method, extra", [
    ("wanda_sp", {}), ("magnitude", {}), ("flap", {}), ("obs_greedy", {}),
    ("flap", {"attention_sparsity": 0.0, "mlp_sparsity": 0.0, "sparsity": 0.4}),
])
def test_streaming_every_method_writes_what_memory_gives(method, extra, tmp_path, tokenizer, calibration_texts):
    from safetensors.torch import load_file

    dense = make_model("llama-gqa")
    dense.save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    tokenizer.save_pretrained(tmp_path / "dense")
    config = _config(calibration_texts, method=method, **extra)
    # Loaded as the streamed skeleton is built (same attention implementation), so the activations match bit for bit.
    memory = OsscarPruner(config).prune(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), tokenizer,
                                        progress=False)
    streamed = OsscarPruner(config).prune_checkpoint(tmp_path / "dense", tmp_path / "out", progress=False)
    tensors = {}
    for shard in streamed.glob("model-*.safetensors"):
        tensors.update(load_file(shard))
    state = memory.state_dict()
    assert set(tensors) <= set(state)
    assert all(torch.equal(tensors[k], state[k]) for k in tensors)
    reloaded = AutoModelForCausalLM.from_pretrained(streamed)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, memory(IDS).logits)
