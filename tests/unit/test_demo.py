"""The demo runs on any machine: its choice of texts without local data or Hub, the run on sampled text, the
model cache keyed by how it was built, the tokenizer rebuilt the same way everywhere, and the library apart from
the demo. Nothing here touches the network: the Hub is "offline" through HF_HUB_OFFLINE or a stub."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from osscar_hf import cli
from osscar_hf.demo import models, run, texts
from osscar_hf.errors import ModelFetchError
from tests.conftest import make_model, make_tokenizer

PACKAGE = Path(__file__).resolve().parents[2] / "osscar_hf"


@pytest.fixture
def no_shared_no_hub(monkeypatch, tmp_path):
    """Neither the project's local data (an empty folder in its place) nor the Hub (offline)."""
    empty = tmp_path / "no-shared-data"
    empty.mkdir()
    monkeypatch.setenv("OSSCAR_HF_SHARED_DATA", str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts._hub_reason.cache_clear()
    yield empty
    texts._hub_reason.cache_clear()


def _write_wikitext(folder: Path) -> None:
    (folder / "wikitext-2-raw").mkdir(parents=True)
    (folder / "wikitext-2-raw" / "wiki.test.raw").write_text(" \n = Title = \n \n Body . \n", encoding="utf-8")


def test_without_local_data_or_hub_both_texts_are_sampled(no_shared_no_hub) -> None:
    chosen = texts.choose_texts()
    assert chosen.calibration == "self" and chosen.evaluation == "self" and chosen.eval_rows is None
    assert "sampled from the dense model" in chosen.calibration_source
    assert "sampled from the dense model" in chosen.evaluation_source


def test_a_folder_with_only_wikitext_evaluates_on_it_and_samples_calibration(no_shared_no_hub) -> None:
    """The first error's advice (OSSCAR_HF_SHARED_DATA with wikitext-2-raw/wiki.test.raw) is enough to run."""
    _write_wikitext(no_shared_no_hub)
    chosen = texts.choose_texts()
    assert chosen.evaluation == "wikitext2" and chosen.eval_rows == ["", " = Title = \n", "", " Body . \n"]
    assert "local copy" in chosen.evaluation_source
    assert chosen.calibration == "self"


def test_local_data_is_preferred(no_shared_no_hub) -> None:
    _write_wikitext(no_shared_no_hub)
    (no_shared_no_hub / "calibration").mkdir()
    (no_shared_no_hub / "calibration" / "state_union.txt").write_text("text", encoding="utf-8")
    chosen = texts.choose_texts()
    assert chosen.calibration == str(no_shared_no_hub / "calibration" / "state_union.txt")
    assert chosen.evaluation == "wikitext2"


def test_with_the_hub_wikitext2_is_used(no_shared_no_hub, monkeypatch) -> None:
    monkeypatch.setattr(texts, "hub_unreachable", lambda: None)
    monkeypatch.setattr("osscar_hf.metrics.load_wikitext2_test", lambda path=None: ["from the hub"])
    chosen = texts.choose_texts()
    assert chosen.calibration == "wikitext2" and chosen.eval_rows == ["from the hub"]
    assert "Hub" in chosen.evaluation_source and "Hub" in chosen.calibration_source


def test_asking_for_wikitext_without_it_names_both_ways_out(no_shared_no_hub) -> None:
    with pytest.raises(RuntimeError) as error:
        texts.choose_texts(evaluation="wikitext2")
    assert "OSSCAR_HF_SHARED_DATA" in str(error.value) and "--evaluation self" in str(error.value)


def test_the_calibration_option_wins(no_shared_no_hub) -> None:
    assert texts.choose_texts("my.txt").calibration == "my.txt"
    assert texts.choose_texts("self", evaluation="self").calibration_source.endswith("(chosen with --calibration self)")


def test_demo_runs_on_sampled_text_without_data(no_shared_no_hub, monkeypatch, capsys) -> None:
    tokenizer = make_tokenizer()
    dense = make_model("llama-gqa", vocab_size=len(tokenizer))
    monkeypatch.setattr(run, "_load_model", lambda cache_dir: (dense, tokenizer))
    sampled: list[tuple[str, int]] = []
    real_sampler = texts.sample_token_windows

    def recording_sampler(model, **kwargs):
        sampled.append((kwargs.get("stream", "calibration"), kwargs["seed"]))
        return real_sampler(model, **kwargs)

    monkeypatch.setattr(texts, "sample_token_windows", recording_sampler)
    monkeypatch.setattr("osscar_hf.pruner.sample_token_windows", recording_sampler)
    monkeypatch.setattr("osscar_hf.demo.run_demo", lambda **kw: run.run_demo(
        **(kw | {"seq_len": 16, "eval_seq_len": 32, "eval_windows": 2, "num_samples": 4, "progress": False})))
    assert cli.main(["--log-level", "WARNING", "demo", "--no-throughput", "--seed", "3"]) == 0
    assert ("evaluation", 4) in sampled and ("calibration", 3) in sampled  # evaluation: other stream, seed + 1
    out = capsys.readouterr().out
    assert "| perplexity (sampled from the model)" in out
    assert "| calibration text" in out and "sampled from the model |" in out
    assert "calibration: text sampled from the dense model (no local calibration text, no Hub)" in out


def test_demo_json_records_the_texts_and_their_provenance(no_shared_no_hub, monkeypatch) -> None:
    tokenizer = make_tokenizer()
    monkeypatch.setattr(run, "_load_model",
                        lambda cache_dir: (make_model("llama-gqa", vocab_size=len(tokenizer)), tokenizer))
    result = run.run_demo(0.5, 0.25, num_samples=4, seq_len=16, eval_seq_len=32, eval_windows=2, throughput=False,
                          progress=False)
    assert result.settings["calibration"] == "self" and result.settings["evaluation"] == "self"
    assert result.report["calibration"]["sampled_from_model"]["seed"] == 0
    assert result.pruned.parameters < result.dense.parameters
    assert json.loads(json.dumps(result.to_dict()))["settings"]["evaluation_source"].startswith("text sampled")


# --------------------------------------------------------------------------- the model cache and its tokenizer
def _fake_checkpoint(folder: Path, recipe: str | None) -> None:
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}", encoding="utf-8")
    info = {"source": models.SMOLLM2_PACKAGE} | ({"recipe": recipe} if recipe else {})
    (folder / models.FETCH_INFO_FILE).write_text(json.dumps(info), encoding="utf-8")


def test_a_cache_built_the_current_way_is_used_as_is(tmp_path) -> None:
    _fake_checkpoint(tmp_path / "smol", models.BUILD_RECIPE)
    assert models.fetch_smollm2(tmp_path / "smol", source=tmp_path / "never-read.gguf") == tmp_path / "smol"


def test_a_cache_built_another_way_is_rebuilt_and_kept_until_then(tmp_path) -> None:
    """A cache from before the tokenizer fix (no recipe) is not trusted: fetch rebuilds it, and a failed rebuild
    leaves it as it was."""
    pytest.importorskip("gguf")
    _fake_checkpoint(tmp_path / "smol", None)
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"not a gguf file")
    with pytest.raises(ModelFetchError, match="checksum mismatch"):  # it did try to rebuild
        models.fetch_smollm2(tmp_path / "smol", source=fake)
    assert models.cached_recipe(tmp_path / "smol") is None and models.is_complete_checkpoint(tmp_path / "smol")


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["12"] = len(vocab)
    backend = Tokenizer(tok_models.BPE(vocab=vocab, merges=[("1", "2")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_the_smollm_pre_tokenizer_splits_digits_one_by_one() -> None:
    """What the GGUF tokenizer lacked (and the original tokenizer.json has): '12' is two tokens, not one."""
    tokenizer = _byte_level_tokenizer()
    assert len(tokenizer("12", add_special_tokens=False)["input_ids"]) == 1
    models.restore_pre_tokenizer(tokenizer, "smollm")
    assert len(tokenizer("12", add_special_tokens=False)["input_ids"]) == 2
    assert tokenizer.decode(tokenizer("a 12b", add_special_tokens=False)["input_ids"]) == "a 12b"


def test_other_pre_tokenizers_are_left_alone() -> None:
    tokenizer = _byte_level_tokenizer()
    models.restore_pre_tokenizer(tokenizer, "llama-bpe")
    assert len(tokenizer("12", add_special_tokens=False)["input_ids"]) == 1


def test_the_fetch_reads_nothing_but_the_gguf() -> None:
    """The tokenizer no longer depends on what the fetching machine has beside the checkout."""
    source = (PACKAGE / "demo" / "models.py").read_text(encoding="utf-8")
    assert "paths" not in source and "tokenizer_file" not in source


# --------------------------------------------------------------------------- the library apart from the demo
def test_the_library_does_not_import_the_demo() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("demo/") or relative == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{'.' * node.level}{node.module or ''}"] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{relative}: {n}" for n in names if n.startswith(("osscar_hf.demo", ".demo", "..demo"))]
    assert offenders == []
    code = ("import sys, osscar_hf, osscar_hf.pruner, osscar_hf.evaluation, osscar_hf.metrics, osscar_hf.cli, "
            "osscar_hf.streaming; print(any(m.startswith('osscar_hf.demo') for m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.stdout.strip() == "False", completed.stderr


def test_sampled_evaluation_text_is_long_enough_for_its_windows() -> None:
    tokenizer = make_tokenizer()
    model = make_model("llama-gqa", vocab_size=len(tokenizer))
    sampled = texts.sample_evaluation_texts(model, tokenizer, windows=3, eval_seq_len=20, sample_len=16, seed=1,
                                            progress=False)
    ids = tokenizer("\n\n".join(sampled), add_special_tokens=False)["input_ids"]
    assert len(ids) >= 3 * 20
    assert torch.is_tensor(texts.sample_token_windows(model, count=1, seq_len=2, seed=0, progress=False))


def test_the_generation_speed_step_is_bounded(caplog) -> None:
    from osscar_hf.evaluation import compare_throughput

    model = make_model("llama-gqa")
    with caplog.at_level("INFO", logger="osscar_hf.evaluation"):
        rates = compare_throughput({"a": model, "b": model}, prompt_len=4, new_tokens=2, repeats=50, max_seconds=0.0)
    assert set(rates) == {"a", "b"} and all(rate > 0 for rate in rates.values())
    assert "median of 1)" in caplog.text  # stopped after the first timed round, not 50
