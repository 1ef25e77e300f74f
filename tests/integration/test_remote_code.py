"""The remote-code format: checkpoints that carry their own modeling code and load with
``from_pretrained(..., trust_remote_code=True)`` where osscar_hf cannot be imported.

Every supported family is saved twice: with per-block shapes (block 0 keeps one KV group and 10 neurons, block 1
loses every head and keeps 24 neurons) and with one shape in both blocks. One subprocess, in which
``import osscar_hf`` fails, loads every folder and compares with the in-memory models' outputs.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from osscar_hf import OsscarConfig, OsscarPruner
from osscar_hf.arch import get_spec
from osscar_hf.io import SaveError, read_block_shapes, resolve_format, save_pruned
from osscar_hf.io.remote_code import (
    REMOTE_CODE_FILES,
    RemoteCodeError,
    RemoteCodeNames,
    remote_code_names,
    render_remote_code,
)
from osscar_hf.io import update_model_config
from osscar_hf.surgery import prune_attention, prune_mlp
from tests.conftest import MODEL_KINDS, make_model, make_tokenizer
from tests.integration.test_save_load import IDS, REPO_ROOT, _assert_same_weights, _logits, _per_block

BASE_TYPES = {"opt": "opt", "llama-mha": "llama", "llama-gqa": "llama", "qwen2": "qwen2", "mistral": "mistral",
              "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2", "gemma3-text": "gemma3_text"}
CLASS_PREFIX = {"opt": "OPT", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "qwen3": "Qwen3",
                "gemma": "Gemma", "gemma2": "Gemma2", "gemma3_text": "Gemma3"}
ALLOWED_IMPORTS = {"__future__", "typing", "torch", "transformers"}


def _uniform(kind: str) -> torch.nn.Module:
    """Both blocks keep their first KV group and every other neuron (24 of 48)."""
    model = make_model(kind, seed=1)
    spec = get_spec(model)
    m, n_rep, head_dim = spec.group_geometry(model.config)
    for block in model.get_submodule(spec.blocks):
        prune_attention(block, spec, torch.tensor([0]), n_rep=n_rep, head_dim=head_dim, num_groups=m)
        prune_mlp(block, spec, torch.arange(0, 48, 2))
    update_model_config(model, spec, n_rep=n_rep, head_dim=head_dim,
                        osscar_config=OsscarConfig(0.5, 0.5, dataset="calibration.txt", seed=1))
    return model


def _load(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager", **kwargs)


def _generate(model: torch.nn.Module) -> torch.Tensor:
    return model.generate(IDS[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """"<kind>/<per-block|uniform>" -> (in-memory model, folder saved with format="remote_code")."""
    tokenizer = make_tokenizer()
    out = {}
    for kind in MODEL_KINDS:
        for variant, build in (("per-block", _per_block), ("uniform", _uniform)):
            model = build(kind)
            folder = save_pruned(model, tmp_path_factory.mktemp(f"rc-{kind}-{variant}"), tokenizer=tokenizer,
                                 format="remote_code", overwrite=True)
            out[f"{kind}/{variant}"] = (model, folder)
    return out


# --------------------------------------------------------------------------- what is written
def test_config_json_declares_the_custom_type_auto_map_shapes_and_layout(saved):
    for name, (model, folder) in saved.items():
        kind = name.split("/")[0]
        base, prefix = BASE_TYPES[kind], CLASS_PREFIX[BASE_TYPES[kind]]
        data = json.loads((folder / "config.json").read_text())
        assert data["model_type"] == f"osscar_{base}", name
        assert data["architectures"] == [f"Osscar{prefix}ForCausalLM"]
        assert data["auto_map"] == {"AutoConfig": f"configuration_osscar.Osscar{prefix}Config",
                                    "AutoModelForCausalLM": f"modeling_osscar.Osscar{prefix}ForCausalLM"}
        assert "quantization_config" not in data  # osscar_hf's quantizer must not act on it
        assert data["osscar_format_version"] == 1 and data["osscar_base_model_type"] == base
        assert data["osscar_block_shapes"] == read_block_shapes(model)
        spec = get_spec(model)
        _, n_rep, head_dim = spec.group_geometry(model.config)
        layout = data["osscar_layout"]
        assert (layout["blocks"], layout["attention"], layout["o_proj"], layout["mlp_consumer"]) == (
            spec.blocks, spec.attention, spec.o_proj, spec.mlp_consumer)
        assert layout["mlp_producers"] == list(spec.mlp_producers)
        assert layout["count_attributes"] == spec.module_count_attrs
        assert (layout["n_rep"], layout["head_dim"]) == (n_rep, head_dim)
        pruning = data["osscar_pruning"]
        assert "quant_method" not in pruning and "block_shapes" not in pruning
        assert pruning["seed"] == (4 if name.endswith("per-block") else 1)
        assert set(pruning["library_versions"]) == {"osscar_hf", "transformers", "torch"}
        assert sorted(p.name for p in folder.glob("*.py")) == sorted(REMOTE_CODE_FILES)
    per_block = json.loads((saved["llama-gqa/per-block"][1] / "config.json").read_text())
    assert per_block["osscar_block_shapes"] == [
        {"num_attention_heads": 2, "num_key_value_heads": 1, "ffn_dim": 10},
        {"num_attention_heads": 0, "num_key_value_heads": 0, "ffn_dim": 24}]
    # The stock fields: dense where the blocks differ, pruned where the stock config expresses the shape.
    assert (per_block["num_attention_heads"], per_block["intermediate_size"]) == (4, 48)
    uniform = json.loads((saved["llama-gqa/uniform"][1] / "config.json").read_text())
    assert (uniform["num_attention_heads"], uniform["num_key_value_heads"], uniform["intermediate_size"]) == (2, 1, 24)


@pytest.mark.parametrize("base", sorted(CLASS_PREFIX))
def test_the_code_files_import_only_torch_and_transformers(base):
    names = remote_code_names(base)
    sources = render_remote_code(names)
    assert sorted(sources) == sorted(REMOTE_CODE_FILES)
    for file_name, source in sources.items():
        tree = ast.parse(source, file_name)
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom):  # the one relative import: the configuration file
                assert (node.level, node.module) == (1, "configuration_osscar")
        assert imported <= ALLOWED_IMPORTS, (file_name, imported)
        assert "osscar_hf" not in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        if base != "llama":  # every family-specific name of the template was substituted
            assert "llama" not in source.lower(), file_name
    prefix = CLASS_PREFIX[base]
    assert f"class Osscar{prefix}Config({names.base_config_class}):" in sources["configuration_osscar.py"]
    assert f'model_type = "osscar_{base}"' in sources["configuration_osscar.py"]
    assert f"class Osscar{prefix}ForCausalLM({names.base_model_class}):" in sources["modeling_osscar.py"]


def test_the_packaged_templates_are_the_llama_rendering():
    templates = Path(__file__).resolve().parents[2] / "osscar_hf" / "remote_code"
    rendered = render_remote_code(remote_code_names("llama"))
    for file_name in REMOTE_CODE_FILES:
        assert rendered[file_name] == (templates / file_name).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- loading without osscar_hf
def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf-home"),
               HF_MODULES_CACHE=str(cwd / "hf-modules"), TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)


def test_loads_without_osscar_hf_only_with_trust_remote_code(saved, tmp_path):
    cases = {}
    for name, (model, folder) in saved.items():
        full = name.endswith("per-block")
        cases[name] = {"folder": str(folder), "logits": _logits(model), "full": full,
                       "generated": _generate(model) if full else None}
    torch.save({"ids": IDS, "cases": cases}, tmp_path / "cases.pt")
    result = _run_python(f"""
        import sys
        sys.modules["osscar_hf"] = None  # what a machine without osscar_hf sees
        try:
            import osscar_hf
        except ImportError:
            pass
        else:
            raise SystemExit("osscar_hf is still importable")
        import json
        import torch
        from transformers import AutoModelForCausalLM

        data = torch.load({str(tmp_path / 'cases.pt')!r})
        results = {{}}
        for name, case in data["cases"].items():
            out = results[name] = {{}}
            try:
                AutoModelForCausalLM.from_pretrained(case["folder"])
            except Exception as exc:
                out["without_trust"] = type(exc).__name__ + ": " + str(exc)
            model, info = AutoModelForCausalLM.from_pretrained(
                case["folder"], trust_remote_code=True, attn_implementation="eager", output_loading_info=True)
            out["class"] = type(model).__module__.split(".")[0] + "." + type(model).__name__
            out["loading_info"] = {{k: sorted(map(str, v)) for k, v in info.items() if v}}
            with torch.no_grad():
                out["logits"] = torch.equal(model(data["ids"]).logits, case["logits"])
            if case["full"]:  # generate (with a KV cache, through a zero-head block), save again and reload
                generated = model.generate(data["ids"][:, :4], max_new_tokens=5, do_sample=False, pad_token_id=1)
                out["generate"] = torch.equal(generated, case["generated"])
                again = case["folder"] + "-again"
                model.save_pretrained(again)
                reloaded = AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True,
                                                                attn_implementation="eager")
                with torch.no_grad():
                    out["again_logits"] = torch.equal(reloaded(data["ids"]).logits, case["logits"])
                out["again_config"] = json.load(open(again + "/config.json"))
        results["modules"] = sorted(m for m in sys.modules if m.startswith("osscar"))
        print()  # transformers' trust_remote_code prompt leaves the line open
        print("RESULTS", json.dumps(results))
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(result.stdout.strip().splitlines()[-1].removeprefix("RESULTS "))
    assert results.pop("modules") == ["osscar_hf"]  # only the blocking entry: nothing of the package ran
    assert sorted(results) == sorted(saved)
    for name, out in results.items():
        kind, variant = name.split("/")
        prefix = CLASS_PREFIX[BASE_TYPES[kind]]
        message = out.get("without_trust", "it loaded without trust_remote_code")
        assert message.startswith("ValueError: ") and "contains custom code" in message, (name, message)
        assert "trust_remote_code=True" in message, (name, message)
        assert out["class"] == f"transformers_modules.Osscar{prefix}ForCausalLM"
        assert out["loading_info"] == {}, name  # no missing, unexpected or mismatched weights
        assert out["logits"], name
        if variant == "per-block":
            assert out["generate"] and out["again_logits"], (name, out)
            saved_config = json.loads((saved[name][1] / "config.json").read_text())
            again = out["again_config"]
            for key in ("model_type", "auto_map", "architectures", "osscar_block_shapes", "osscar_layout",
                        "osscar_base_model_type", "osscar_pruning"):
                assert again[key] == saved_config[key], (name, key)
            assert sorted(p.name for p in Path(f"{saved[name][1]}-again").glob("*.py")) == sorted(REMOTE_CODE_FILES)


# --------------------------------------------------------------------------- with osscar_hf imported
def test_loads_the_same_with_osscar_hf_imported(saved):
    for name, (model, folder) in saved.items():
        loaded = _load(folder)
        assert getattr(loaded, "hf_quantizer", None) is None  # not the osscar quantizer: no quantization_config
        assert read_block_shapes(loaded) == read_block_shapes(model)  # osscar_hf reads the remote-code model too
        _assert_same_weights(loaded, model)
        assert torch.equal(_logits(loaded), _logits(model)), name
    zero_head = _load(saved["opt/per-block"][1]).model.decoder.layers[1].self_attn
    assert type(zero_head).__name__ == "OsscarEmptyAttention" and zero_head.q_proj.out_features == 0
    assert _load(saved["opt/uniform"][1]).model.decoder.layers[0].self_attn.num_heads == 1
    assert _load(saved["qwen2/per-block"][1]).model.layers[0].mlp.intermediate_size == 10


@pytest.mark.parametrize("kind", ["llama-gqa", "gemma3-text"])
def test_a_first_block_with_no_head_keeps_its_norms_and_the_cache_length(kind, tmp_path):
    """Block 0 without heads: its q/k norms (Gemma 3's) stay in the checkpoint, and a decoding loop of one's own
    (positions from the cache's length, which transformers reads from block 0) gives the full forward's logits."""
    model = make_model(kind, seed=2)
    spec = get_spec(model)
    m, n_rep, head_dim = spec.group_geometry(model.config)
    prune_attention(model.get_submodule(spec.blocks)[0], spec, torch.tensor([], dtype=torch.long), n_rep=n_rep,
                    head_dim=head_dim, num_groups=m)
    folder = save_pruned(model, tmp_path / "rc", format="remote_code")
    loaded, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager",
                                                        output_loading_info=True)
    assert not any(info.values()), info
    assert type(loaded.get_submodule(spec.blocks)[0].get_submodule(spec.attention)).__name__ == "OsscarEmptyAttention"
    assert loaded.state_dict().keys() == make_model(kind).state_dict().keys()
    _assert_same_weights(loaded, model)
    with torch.no_grad():
        prefix = loaded(IDS[:, :9], use_cache=True)
        assert prefix.cache.get_seq_length() == 9
        step = loaded(IDS[:, 9:10], cache=prefix.cache).logits[:, -1]
        torch.testing.assert_close(step, model(IDS[:, :10]).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_without_trust_remote_code_stock_transformers_refuses_in_process(saved):
    with pytest.raises(ValueError, match="(?s)contains custom code.*trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(saved["mistral/per-block"][1])
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoConfig.from_pretrained(saved["opt/uniform"][1])


@pytest.mark.parametrize("name", ["llama-gqa/per-block", "opt/per-block"])
def test_loaded_model_casts_and_loads_with_a_device_map(saved, name):
    model, folder = saved[name]
    loaded = _load(folder)
    assert loaded.half() is loaded and loaded.dtype == torch.float16
    assert torch.equal(_logits(loaded), _logits(copy.deepcopy(model).half()))
    assert loaded.to(torch.bfloat16).dtype == torch.bfloat16 and loaded.float().dtype == torch.float32
    assert torch.equal(_logits(loaded), _logits(copy.deepcopy(model).half().to(torch.bfloat16).float()))
    auto = _load(folder, device_map="auto")
    assert {p.device.type for p in auto.parameters()} == {"cpu"}
    assert torch.equal(_logits(auto), _logits(model))
    assert torch.equal(_generate(auto), _generate(model))
    as_bf16 = _load(folder, dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16
    reference = copy.deepcopy(model)
    for param in reference.parameters():
        param.data = param.data.to(torch.bfloat16)
    assert torch.equal(_logits(as_bf16), _logits(reference))


def test_bad_osscar_fields_fail_with_the_field_named(saved, tmp_path):
    import shutil

    _, folder = saved["llama-gqa/per-block"]
    for key, value, match in (
        ("osscar_block_shapes", [{"num_attention_heads": 2, "num_key_value_heads": 1, "ffn_dim": 10}],
         "osscar_block_shapes must be a list of 2 block shapes"),
        ("osscar_block_shapes", [{"num_attention_heads": 3, "num_key_value_heads": 2, "ffn_dim": 10}] * 2,
         r"osscar_block_shapes\[0\] .* 1 to n_rep = 2"),
        ("osscar_format_version", 2, "osscar_format_version = 2.*newer osscar_hf"),
        ("osscar_layout", None, "osscar_layout is missing"),
    ):
        broken = tmp_path / f"broken-{key}-{value if not isinstance(value, list) else len(value)}"
        shutil.copytree(folder, broken)
        data = json.loads((broken / "config.json").read_text())
        data[key] = value
        (broken / "config.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match=match):
            _load(broken)
    grown = tmp_path / "grown"
    shutil.copytree(folder, grown)
    data = json.loads((grown / "config.json").read_text())
    data["osscar_block_shapes"][0]["ffn_dim"] = 64
    (grown / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="cannot shrink a block built with .* osscar_block_shapes disagree"):
        _load(grown)


def test_rewrite_config_alone_writes_the_format_for_a_streamed_checkpoint(tmp_path):
    """prune_checkpoint writes the weights itself and then calls rewrite_config on a config-only folder."""
    from safetensors.torch import save_model

    from osscar_hf.io.save import rewrite_config

    model = _per_block("qwen2")
    model.config.save_pretrained(tmp_path)
    rewrite_config(tmp_path, model, "remote_code")
    assert sorted(p.name for p in tmp_path.glob("*.py")) == sorted(REMOTE_CODE_FILES)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "osscar_qwen2" and data["osscar_block_shapes"] == read_block_shapes(model)
    save_model(model, str(tmp_path / "model.safetensors"))
    assert torch.equal(_logits(_load(tmp_path)), _logits(model))
    with pytest.raises(SaveError, match="needs a resolved format.*got 'auto'"):
        rewrite_config(tmp_path, model, "auto")


# --------------------------------------------------------------------------- save_pruned and conversions
def test_real_pruning_saved_as_remote_code_with_its_card(tokenizer, calibration_texts, tmp_path):
    config = OsscarConfig(0.5, 0.5, dataset=calibration_texts, num_samples=8, seq_len=32, batch_size=4, device="cpu")
    model = OsscarPruner(config).prune(make_model("qwen2"), tokenizer, progress=False)
    assert resolve_format(model, "auto") == "stock" and resolve_format(model, "remote_code") == "remote_code"
    folder = save_pruned(model, tmp_path / "rc", tokenizer=tokenizer, format="remote_code")
    card = (folder / "README.md").read_text()
    assert "trust_remote_code=True" in card and "import osscar_hf" not in card and "osscar_qwen2" in card
    data = json.loads((folder / "config.json").read_text())
    assert data["osscar_pruning"]["num_samples"] == 8 and data["osscar_pruning"]["attention_sparsity"] == 0.5
    assert data["osscar_pruning"]["dataset"].startswith("<in-memory calibration data:")
    assert torch.equal(_logits(_load(folder)), _logits(model))
    # The stock format's card says it loads with vanilla transformers.
    stock = save_pruned(model, tmp_path / "stock")
    card = (stock / "README.md").read_text()
    assert "import osscar_hf" not in card and "without `osscar_hf`" in card
    assert not list(stock.glob("*.py"))


def test_any_model_of_a_supported_family_can_be_written(tmp_path):
    model = make_model("mistral")  # never pruned: no record, the dense shapes
    folder = save_pruned(model, tmp_path / "dense", format="remote_code", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()  # sharded, like any checkpoint
    data = json.loads((folder / "config.json").read_text())
    assert data["osscar_pruning"] is None
    assert data["osscar_block_shapes"] == [{"num_attention_heads": 4, "num_key_value_heads": 2, "ffn_dim": 48}] * 2
    assert torch.equal(_logits(_load(folder)), _logits(model))
    # A block cut by hand, without the pruner's record: the osscar format cannot be written, this one can.
    spec = get_spec(model)
    prune_mlp(model.get_submodule(spec.blocks)[0], spec, torch.arange(30))
    with pytest.raises(SaveError, match="format='auto' picks the osscar format here.*or format='remote_code'"):
        save_pruned(model, tmp_path / "auto")
    cut = save_pruned(model, tmp_path / "cut", format="remote_code")
    assert json.loads((cut / "config.json").read_text())["osscar_block_shapes"][0]["ffn_dim"] == 30
    assert torch.equal(_logits(_load(cut)), _logits(model))
    with pytest.raises(SaveError, match=r"format must be one of \['auto', 'stock', 'osscar', 'remote_code'\]"):
        save_pruned(model, tmp_path / "bad", format="remote-code")
    with pytest.raises(RemoteCodeError, match="no config and causal-LM class for model_type 'bert'"):
        remote_code_names("bert")
    assert isinstance(remote_code_names("opt"), RemoteCodeNames)
    gemma3 = remote_code_names("gemma3")  # a multimodal family: its causal LM is a *ForConditionalGeneration
    assert (gemma3.model_class, gemma3.config_class) == ("OsscarGemma3ForConditionalGeneration", "OsscarGemma3Config")


def test_a_remote_code_model_saves_back_to_the_other_formats(saved, tmp_path):
    model, folder = saved["opt/per-block"]
    loaded = _load(folder)
    assert resolve_format(loaded, "auto") == "osscar"
    osscar = save_pruned(loaded, tmp_path / "osscar", format="auto")
    data = json.loads((osscar / "config.json").read_text())
    assert data["model_type"] == "opt" and data["architectures"] == ["OPTForCausalLM"]
    assert "auto_map" not in data and not [k for k in data if k.startswith("osscar_")]
    assert data["quantization_config"]["block_shapes"] == read_block_shapes(model)
    assert data["quantization_config"]["seed"] == 4  # the provenance came back as the pruning record
    assert not list(osscar.glob("*.py"))
    reloaded = AutoModelForCausalLM.from_pretrained(osscar, attn_implementation="eager")  # the osscar quantizer
    assert torch.equal(_logits(reloaded), _logits(model))

    uniform_model, uniform_folder = saved["llama-gqa/uniform"]
    stock = save_pruned(_load(uniform_folder), tmp_path / "stock", format="stock")
    data = json.loads((stock / "config.json").read_text())
    assert data["model_type"] == "llama" and "quantization_config" not in data and "auto_map" not in data
    plain = AutoModelForCausalLM.from_pretrained(stock, attn_implementation="eager")
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert torch.equal(_logits(plain), _logits(uniform_model))

    again = save_pruned(loaded, tmp_path / "again", format="remote_code")
    assert json.loads((again / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    assert torch.equal(_logits(_load(again)), _logits(model))


def test_pruning_a_remote_code_model_again_says_it_is_already_pruned(saved):
    from osscar_hf.errors import UnsupportedModelError

    loaded = _load(saved["llama-gqa/uniform"][1])
    config = OsscarConfig(0.5, 0.5, dataset=[[1, 2, 3, 4]], num_samples=1, seq_len=4, device="cpu")
    with pytest.raises(UnsupportedModelError, match="already pruned by osscar_hf.*remote-code format"):
        OsscarPruner(config).prune(loaded)
