"""Pruned checkpoints that load anywhere: save, reload bit-exactly, keep working, never destroy the dense model.

Models with per-block shapes (different in every block, one block with no head left) are cut by hand with
the surgery functions, which is what the pruner does after solving; a few tests run the real pruner.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import osscar_hf
from osscar_hf import OsscarConfig, OsscarPruner
from osscar_hf.arch import get_spec
from osscar_hf.errors import OsscarError, SurgeryError, UnsupportedModelError
from osscar_hf.integrations import is_registered, register
from osscar_hf.integrations.quantizer import NotDequantizableError, OsscarHfQuantizer
from osscar_hf.io import SaveError, apply_block_shapes, pruning_record, read_block_shapes, save_pruned
from osscar_hf.io import update_model_config
from osscar_hf.surgery import EmptyAttention, prune_attention, prune_mlp
from tests.conftest import VOCAB, make_model

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(num_samples=8, seq_len=32, batch_size=4, device="cpu")
IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
PER_BLOCK_KINDS = ("opt", "llama-gqa", "qwen2", "qwen3", "gemma", "gemma2", "gemma3-text")
# Pruned uniformly (in every block the same shape), which the stock config of these kinds expresses.
STOCK_KINDS = ("llama-gqa", "qwen2", "llama-mha", "qwen3", "gemma", "gemma2", "gemma3-text")


def _per_block(kind: str) -> torch.nn.Module:
    """Block 0 keeps its last KV group and 10 neurons, block 1 loses every head and keeps 24 neurons."""
    model = make_model(kind)
    spec = get_spec(model)
    m, n_rep, head_dim = spec.group_geometry(model.config)
    neurons = spec.ffn_dim(model.config)
    for block, groups, kept in zip(model.get_submodule(spec.blocks), ([m - 1], []), (range(0, 20, 2), range(24))):
        prune_attention(block, spec, torch.tensor(groups, dtype=torch.long), n_rep=n_rep, head_dim=head_dim,
                        num_groups=m)
        prune_mlp(block, spec, torch.tensor(list(kept), dtype=torch.long))
    assert neurons == 48
    update_model_config(model, spec, n_rep=n_rep, head_dim=head_dim,
                        osscar_config=OsscarConfig(0.5, 0.5, dataset=["some text"] * 3, seed=4))
    return model


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.to(model.device)).logits.cpu()


def _load(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", **kwargs)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key].cpu(), sb[key].cpu()), key


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (in-memory per-block model, folder it was saved to with plain save_pretrained)."""
    out = {}
    for kind in PER_BLOCK_KINDS:
        model = _per_block(kind)
        folder = tmp_path_factory.mktemp(f"per-block-{kind}")
        model.save_pretrained(folder)
        out[kind] = (model, folder)
    return out


# --------------------------------------------------------------------------- 1. shapes in the config
def test_per_block_shapes_are_the_quantization_config(saved):
    model, folder = saved["llama-gqa"]
    shapes = [{"num_attention_heads": 2, "num_key_value_heads": 1, "ffn_dim": 10},
              {"num_attention_heads": 0, "num_key_value_heads": 0, "ffn_dim": 24}]
    assert read_block_shapes(model) == shapes
    qc = model.config.quantization_config
    assert isinstance(qc, OsscarConfig) and qc.block_shapes == shapes and qc.seed == 4
    assert not hasattr(model.config, "osscar_block_shapes")
    data = json.loads((folder / "config.json").read_text())
    stored = data["quantization_config"]
    assert stored["quant_method"] == "osscar" and stored["block_shapes"] == shapes
    assert set(stored["library_versions"]) == {"osscar_hf", "transformers", "torch"}
    assert stored["dataset"].startswith("<in-memory calibration data: 3 texts, 27 chars, sha256 ")
    assert OsscarConfig.from_dict(stored) == qc
    # The stock fields stay those of the dense model: the blocks do not share one shape.
    assert data["num_attention_heads"] == 4 and data["intermediate_size"] == 48


def test_real_pruning_stores_a_small_config(tokenizer, calibration_texts, tmp_path):
    texts = calibration_texts * 200  # about 5 MB of calibration text must not reach config.json
    model = OsscarPruner(OsscarConfig(0.5, 0.5, dataset=texts, **SMALL)).prune(make_model("opt"), tokenizer,
                                                                               progress=False)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").stat().st_size < 4000
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored["block_shapes"] == [{"num_attention_heads": 2, "num_key_value_heads": 2, "ffn_dim": 24}] * 2
    assert stored["attention_sparsity"] == 0.5 and stored["num_samples"] == 8
    assert stored["dataset"].startswith(f"<in-memory calibration data: {len(texts)} texts")
    reloaded = _load(tmp_path)
    assert torch.equal(_logits(reloaded), _logits(model))


# --------------------------------------------------------------------------- 2. loading through the quantizer
@pytest.mark.parametrize("kind", PER_BLOCK_KINDS)
def test_per_block_checkpoint_reloads_bit_exact(saved, kind):
    model, folder = saved[kind]
    loaded = _load(folder)
    assert isinstance(loaded.hf_quantizer, OsscarHfQuantizer)
    assert read_block_shapes(loaded) == read_block_shapes(model)
    spec = get_spec(loaded)
    assert isinstance(loaded.get_submodule(spec.blocks)[1].get_submodule(spec.attention), EmptyAttention)
    _assert_same_weights(loaded, model)
    assert torch.equal(_logits(loaded), _logits(model))
    generated = loaded.generate(IDS[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=1)
    expected = model.generate(IDS[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert torch.equal(generated, expected)


def _offload_map(kind: str) -> dict[str, str]:
    if kind == "opt":
        prefix, extra = "model.decoder", ["embed_positions", "final_layer_norm"]
    else:
        prefix, extra = "model", ["norm", "rotary_emb"]
    device_map = {f"{prefix}.embed_tokens": "cpu", f"{prefix}.layers.0": "cpu", f"{prefix}.layers.1": "disk",
                  "lm_head": "cpu"}
    device_map.update({f"{prefix}.{name}": "cpu" for name in extra})
    return device_map


@pytest.mark.parametrize("kind", ["opt", "llama-gqa"])
def test_device_maps_auto_cpu_and_disk_offload(saved, kind, tmp_path):
    model, folder = saved[kind]
    expected = _logits(model)
    auto = _load(folder, device_map="auto")
    if auto.device.type == "cpu":
        assert torch.equal(_logits(auto), expected)
    else:  # pragma: no cover - on a GPU machine
        torch.testing.assert_close(_logits(auto), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(_logits(_load(folder, device_map={"": "cpu"})), expected)
    offloaded = _load(folder, device_map=_offload_map(kind), offload_folder=tmp_path / "offload")
    assert any(p.device.type == "meta" for p in offloaded.parameters())  # block 1 really lives on disk
    assert torch.equal(_logits(offloaded), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_on_load_matches_casting_in_memory(saved, dtype):
    model, folder = saved["qwen2"]
    loaded = _load(folder, dtype=dtype)
    assert loaded.dtype == dtype
    # from_pretrained(dtype=...) casts the weights and keeps the rotary buffers in float32 (as for any
    # stock model), which `model.to(dtype)` would cast too: cast only the parameters of the reference.
    reference = copy.deepcopy(model)
    for param in reference.parameters():
        param.data = param.data.to(dtype)
    _assert_same_weights(loaded, reference)
    assert torch.equal(_logits(loaded), _logits(reference))


# --------------------------------------------------------------------------- 3. the loaded model stays usable
def test_loaded_model_casts_with_half_float_and_to(saved):
    model, folder = saved["opt"]
    loaded = _load(folder)
    assert not loaded.is_quantized and not hasattr(loaded.config, "_is_quantized")  # plain weights
    assert loaded.half() is loaded and loaded.dtype == torch.float16
    assert torch.equal(_logits(loaded), _logits(copy.deepcopy(model).half()))
    assert loaded.float().dtype == torch.float32
    assert loaded.to(torch.bfloat16).dtype == torch.bfloat16
    assert loaded.hf_quantizer.is_serializable() and loaded.hf_quantizer.is_trainable


def test_loaded_model_compiles(saved):
    model, folder = saved["llama-gqa"]
    loaded = _load(folder)
    assert loaded.hf_quantizer.is_compileable  # generate() may auto-compile it
    compiled = torch.compile(loaded, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(_logits(compiled), _logits(model), rtol=1e-6, atol=1e-6)


def test_dequantize_raises_and_keeps_the_shapes(saved):
    model, folder = saved["opt"]
    loaded = _load(folder)
    with pytest.raises(NotDequantizableError, match="nothing to dequantize|already full precision") as info:
        loaded.dequantize()
    assert isinstance(info.value, NotImplementedError) and isinstance(info.value, OsscarError)
    assert loaded.config.quantization_config.block_shapes == read_block_shapes(model)
    assert loaded.hf_quantizer is not None


def test_loaded_model_trains_with_trainer(saved, tmp_path):
    from transformers import Trainer, TrainingArguments

    _, folder = saved["opt"]
    loaded = _load(folder)
    loaded.train()
    assert loaded.hf_quantizer.is_qat_trainable
    rows = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in rows]
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    result = Trainer(model=loaded, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [k for k, v in loaded.state_dict().items() if not torch.equal(before[k], v)]
    assert any("fc1" in k for k in changed) and any("q_proj" in k for k in changed)
    # A trained model saves and reloads like any other.
    loaded.save_pretrained(tmp_path / "trained")
    _assert_same_weights(_load(tmp_path / "trained"), loaded)


# peft calls transformers' deprecated `is_gradient_checkpointing`, which pyproject turns into an error.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_loaded_model_takes_lora_adapters(saved, tmp_path):
    peft = pytest.importorskip("peft")
    _, folder = saved["llama-gqa"]
    loaded = _load(folder)
    lora = peft.get_peft_model(loaded, peft.LoraConfig(r=2, target_modules=["up_proj", "down_proj"],
                                                       lora_dropout=0.0))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    out = lora(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)
    lora.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["opt", "qwen2"])
def test_loaded_model_saves_again_and_reloads_bit_exact(saved, kind, tmp_path):
    model, folder = saved[kind]
    loaded = _load(folder)
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["quantization_config"] == json.loads((folder / "config.json").read_text())["quantization_config"]
    reloaded = _load(tmp_path / "again")
    _assert_same_weights(reloaded, model)
    assert torch.equal(_logits(reloaded), _logits(model))


def test_loaded_pruned_checkpoint_cannot_be_pruned_again(saved, tokenizer, calibration_texts):
    _, folder = saved["opt"]
    pruner = OsscarPruner(OsscarConfig(0.5, 0.5, dataset=calibration_texts, **SMALL))
    with pytest.raises(UnsupportedModelError, match="already pruned"):
        pruner.prune(_load(folder), tokenizer, progress=False)


def test_pruning_on_load_is_refused_with_a_pointer_to_the_pruner(tmp_path):
    make_model("opt").save_pretrained(tmp_path)
    with pytest.raises(OsscarError, match="does not prune while loading.*OsscarPruner"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=OsscarConfig(0.5, 0.5))


def test_inconsistent_shapes_fail_clearly(tmp_path):
    model = make_model("llama-gqa")
    shape = {"num_attention_heads": 2, "num_key_value_heads": 1, "ffn_dim": 8}
    with pytest.raises(OsscarError, match="lists block shapes for 1 blocks but the model has 2 blocks"):
        apply_block_shapes(model, [shape])
    with pytest.raises(SurgeryError, match="cannot grow a block"):
        apply_block_shapes(model, [{**shape, "ffn_dim": 64}] * 2)
    with pytest.raises(SurgeryError, match="same number of query heads, 1 to 2"):
        apply_block_shapes(model, [{**shape, "num_attention_heads": 3}] * 2)
    with pytest.raises(SurgeryError, match="same number of query heads, 1 to 2"):
        apply_block_shapes(model, [{**shape, "num_attention_heads": 0}] * 2)
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["quantization_config"] = {"quant_method": "osscar"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(OsscarError, match="no block_shapes"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- 2. registration
def test_registration_is_idempotent():
    from transformers.quantizers import auto

    assert is_registered()
    register()
    register()
    osscar_hf.integrations.install()
    assert auto.AUTO_QUANTIZER_MAPPING["osscar"] is OsscarHfQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["osscar"] is OsscarConfig


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_import_is_cheap_and_registers_when_transformers_loads(saved, tmp_path):
    model, folder = saved["qwen2"]
    torch.save({"ids": IDS, "logits": _logits(model)}, tmp_path / "expected.pt")
    result = _run_python(f"""
        import sys, time
        start = time.perf_counter()
        import osscar_hf
        seconds = time.perf_counter() - start
        assert "transformers" not in sys.modules and "torch" not in sys.modules, "import osscar_hf is not lazy"
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, attn_implementation="eager")
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        with torch.no_grad():
            assert torch.equal(model(expected["ids"]).logits, expected["logits"])
        print("import seconds", round(seconds, 3))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split()[-1]) < 1.0


# --------------------------------------------------------------------------- 4. and 5. without osscar_hf
@pytest.fixture(scope="module")
def stock_pruned(tokenizer, calibration_texts, tmp_path_factory):
    """kind -> (pruned model, folder) for pruning the stock config can express (no quantization_config)."""
    out = {}
    for kind, attention in (*((kind, 0.5) for kind in STOCK_KINDS), ("opt", 0.0)):
        model = OsscarPruner(OsscarConfig(attention, 0.5, dataset=calibration_texts, **SMALL)).prune(
            make_model(kind), tokenizer, progress=False)
        folder = tmp_path_factory.mktemp(f"stock-{kind}")
        model.save_pretrained(folder)
        out[kind] = (model, folder)
    return out


def test_stock_checkpoints_have_a_plain_config(stock_pruned):
    for kind, (model, folder) in stock_pruned.items():
        data = json.loads((folder / "config.json").read_text())
        assert "quantization_config" not in data, kind
        spec = get_spec(model)
        assert data[spec.config_ffn] == 24
        if kind == "llama-mha":
            assert (data["num_attention_heads"], data["num_key_value_heads"], data["head_dim"]) == (2, 2, 8)
        elif kind != "opt":  # half the KV groups; head_dim written explicitly (qwen3's is not hidden_size // heads)
            assert (data["num_attention_heads"], data["num_key_value_heads"]) == (2, 1), kind
            assert data["head_dim"] == (16 if kind == "qwen3" else 8), kind
        assert pruning_record(model).block_shapes == read_block_shapes(model)  # the in-memory record remains


def test_without_osscar_hf_stock_loads_bit_exact_and_osscar_format_fails_loudly(saved, stock_pruned, tmp_path):
    cases = {kind: (folder, _logits(model)) for kind, (model, folder) in stock_pruned.items()}
    cases["per-block-opt"] = (saved["opt"][1], _logits(saved["opt"][0]))
    torch.save({"ids": IDS, "cases": {k: (str(f), v) for k, (f, v) in cases.items()}}, tmp_path / "cases.pt")
    result = _run_python(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        data = torch.load({str(tmp_path / 'cases.pt')!r})
        results = {{}}
        for kind, (folder, expected) in data["cases"].items():
            try:
                model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
            except Exception as exc:
                results[kind] = type(exc).__name__ + ": " + str(exc)
                continue
            with torch.no_grad():
                results[kind] = bool(torch.equal(model(data["ids"]).logits, expected))
        assert "osscar_hf" not in sys.modules
        print(json.dumps(results))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert results.pop("per-block-opt").startswith("RuntimeError: You set `ignore_mismatched_sizes` to `False`")
    assert results == {kind: True for kind in (*STOCK_KINDS, "opt")}
    assert "Unknown quantization type, got osscar" in result.stderr
    assert "MISMATCH" in result.stderr


# --------------------------------------------------------------------------- 5. save_pruned and its formats
def test_save_pruned_auto_picks_stock_or_osscar(saved, stock_pruned, tmp_path, tokenizer):
    model, _ = stock_pruned["llama-gqa"]
    folder = save_pruned(model, tmp_path / "stock", tokenizer=tokenizer)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (folder / "tokenizer.json").is_file()
    per_block, _ = saved["qwen2"]
    folder = save_pruned(per_block, tmp_path / "osscar", max_shard_size="10KB")
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "osscar"
    weights = sorted(p.name for p in folder.iterdir() if p.name.startswith("model"))
    assert len(weights) > 2 and all(n.endswith((".safetensors", ".safetensors.index.json")) for n in weights)
    assert torch.equal(_logits(_load(folder)), _logits(per_block))  # sharded osscar checkpoints load too
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_save_pruned_can_force_the_osscar_format(stock_pruned, tmp_path):
    model, _ = stock_pruned["qwen2"]
    folder = save_pruned(model, tmp_path / "forced", format="osscar")
    stored = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert stored["block_shapes"] == read_block_shapes(model)
    loaded = _load(folder)
    assert isinstance(loaded.hf_quantizer, OsscarHfQuantizer)
    assert torch.equal(_logits(loaded), _logits(model))
    # ...and a loaded osscar-format model whose shapes are stock can be exported as a plain checkpoint.
    plain = save_pruned(loaded, tmp_path / "plain", format="stock")
    assert "quantization_config" not in json.loads((plain / "config.json").read_text())


def test_save_pruned_stock_refuses_shapes_the_config_cannot_express(saved, tokenizer, calibration_texts,
                                                                     tmp_path):
    with pytest.raises(SaveError, match="do not all have the same shape"):
        save_pruned(saved["llama-gqa"][0], tmp_path / "a", format="stock")
    opt = OsscarPruner(OsscarConfig(0.5, 0.5, dataset=calibration_texts, **SMALL)).prune(
        make_model("opt"), tokenizer, progress=False)
    with pytest.raises(SaveError, match="opt derives head_dim from hidden_size // num_attention_heads"):
        save_pruned(opt, tmp_path / "b", format="stock")
    # Uniform, but LlamaConfig rejects 3 heads for hidden_size 32: the osscar format carries the shapes.
    mha = OsscarPruner(OsscarConfig(0.25, 0.0, dataset=calibration_texts, **SMALL)).prune(
        make_model("llama-mha"), tokenizer, progress=False)
    assert mha.config.quantization_config.block_shapes[0]["num_attention_heads"] == 3
    with pytest.raises(SaveError, match="hidden_size=32 to be a multiple of num_attention_heads=3"):
        save_pruned(mha, tmp_path / "b", format="stock")
    assert torch.equal(_logits(_load(save_pruned(mha, tmp_path / "b"))), _logits(mha))
    shutil.rmtree(tmp_path / "b")
    with pytest.raises(SaveError, match="format must be one of"):
        save_pruned(opt, tmp_path / "c", format="gguf")
    with pytest.raises(SaveError, match="has none: save it with format='stock'"):
        save_pruned(make_model("opt"), tmp_path / "d", format="osscar")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- 6. never destroy the dense model
@pytest.fixture
def dense_folder_and_pruned(tmp_path):
    dense = tmp_path / "dense"
    make_model("llama-gqa").save_pretrained(dense)
    model = AutoModelForCausalLM.from_pretrained(dense, attn_implementation="eager")
    spec = get_spec(model)
    m, n_rep, head_dim = spec.group_geometry(model.config)
    for block in model.get_submodule(spec.blocks):
        prune_mlp(block, spec, torch.arange(24))
    update_model_config(model, spec, n_rep=n_rep, head_dim=head_dim)
    return dense, model


def test_the_dense_folder_is_refused(dense_folder_and_pruned, monkeypatch):
    dense, model = dense_folder_and_pruned
    before = _digest(dense)
    monkeypatch.chdir(dense.parent)
    for target in (dense, str(dense) + os.sep, "dense", Path("dense") / ".." / "dense"):
        with pytest.raises(SaveError, match="dense model it was pruned from was loaded from that folder"):
            model.save_pretrained(target)
        with pytest.raises(SaveError, match="would overwrite the dense weights"):
            save_pruned(model, target, overwrite=True)
    with pytest.raises(SaveError, match="loaded from that folder"):
        copy.deepcopy(model).save_pretrained(dense)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # pickling the whole model keeps the guard too
    buffer.seek(0)
    with pytest.raises(SaveError, match="loaded from that folder"):
        torch.load(buffer, weights_only=False).save_pretrained(dense)
    assert _digest(dense) == before
    model.save_pretrained(dense.parent / "elsewhere")  # plain save_pretrained elsewhere works as usual
    assert torch.equal(_logits(_load(dense.parent / "elsewhere")), _logits(model))


def test_non_empty_folder_needs_overwrite_which_replaces_it(stock_pruned, tmp_path):
    model, _ = stock_pruned["llama-gqa"]
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(SaveError, match=r"not empty \(notes.txt\); pass overwrite=True"):
        save_pruned(model, target)
    assert (target / "notes.txt").read_text() == "mine"
    save_pruned(model, target, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert save_pruned(model, empty) == empty.absolute()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


class _InterruptingTokenizer:
    def save_pretrained(self, folder):
        raise KeyboardInterrupt


def test_an_interrupted_save_leaves_nothing_that_looks_like_a_checkpoint(stock_pruned, tmp_path):
    model, _ = stock_pruned["llama-gqa"]
    with pytest.raises(KeyboardInterrupt):
        save_pruned(model, tmp_path / "new", tokenizer=_InterruptingTokenizer())
    assert list(tmp_path.iterdir()) == []
    previous = save_pruned(model, tmp_path / "old")
    before = _digest(previous)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(model, previous, tokenizer=_InterruptingTokenizer(), overwrite=True)
    assert _digest(previous) == before and [p.name for p in tmp_path.iterdir()] == ["old"]


def test_move_into_place_replaces_only_what_it_was_asked_to(tmp_path):
    from osscar_hf.io.save import OutputConflictError, move_into_place

    def staged(name: str) -> Path:
        folder = tmp_path / f".{name}.staged"
        folder.mkdir()
        (folder / "model.safetensors").write_text("new", encoding="utf-8")
        return folder

    move_into_place(staged("missing"), tmp_path / "missing", overwrite=False)  # nothing there yet
    (tmp_path / "empty").mkdir()
    move_into_place(staged("empty"), tmp_path / "empty", overwrite=False)      # an empty folder: nothing to lose
    for name in ("missing", "empty"):
        assert (tmp_path / name / "model.safetensors").read_text(encoding="utf-8") == "new"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep", encoding="utf-8")
    (tmp_path / "file").write_text("keep", encoding="utf-8")
    for name in ("busy", "file"):
        tmp = staged(name)
        with pytest.raises(OutputConflictError, match=rf"refusing to replace .*{name}"):
            move_into_place(tmp, tmp_path / name, overwrite=False)
        assert (tmp / "model.safetensors").is_file()  # the caller decides what becomes of it
    assert (tmp_path / "busy" / "mine.txt").read_text(encoding="utf-8") == "keep"
    assert (tmp_path / "file").read_text(encoding="utf-8") == "keep"
    move_into_place(tmp_path / ".busy.staged", tmp_path / "busy", overwrite=True)  # asked to: replaced whole
    assert sorted(os.listdir(tmp_path / "busy")) == ["model.safetensors"]
    # A symbolic link is the folder it points to: an empty one is filled, a busy one refused, the link kept.
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    move_into_place(staged("link"), tmp_path / "link", overwrite=False)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "model.safetensors").is_file()
    with pytest.raises(OutputConflictError, match=r"refusing to replace .*real.*model\.safetensors"):
        move_into_place(staged("link2"), tmp_path / "link", overwrite=False)
