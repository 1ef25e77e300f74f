"""Tests of the osscar-hf command line: argument parsing of every command, and prune / eval / push run end to
end on tiny random models saved in a temporary folder (nothing is downloaded)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from osscar_hf import cli
from osscar_hf.demo import DemoResult, ModelMeasurements
from osscar_hf.evaluation import evaluate_perplexity
from osscar_hf.metrics import load_model_and_tokenizer
from tests.conftest import VOCAB, make_model, make_text, make_tokenizer


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code


def test_top_level_help_lists_demo(capsys) -> None:
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out
    assert "usage: osscar-hf" in out


def test_demo_help_lists_options(capsys) -> None:
    assert _exit_code(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--attention-sparsity", "--mlp-sparsity", "--num-samples", "--eval-windows"):
        assert option in out


def test_missing_command_exits_non_zero(capsys) -> None:
    assert _exit_code([]) != 0
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1.5", "1", "-0.1", "abc", "nan", "1/0"])
def test_bad_sparsity_exits_non_zero_naming_the_value(capsys, value) -> None:
    assert _exit_code(["demo", "--mlp-sparsity", value]) != 0
    err = capsys.readouterr().err
    assert "--mlp-sparsity" in err
    assert repr(value) in err


def test_bad_attention_sparsity_is_rejected(capsys) -> None:
    assert _exit_code(["demo", "--attention-sparsity", "2"]) != 0
    assert "'2'" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--num-samples", "--seq-len", "--eval-seq-len"])
def test_non_positive_counts_are_rejected(capsys, option) -> None:
    assert _exit_code(["demo", option, "0"]) != 0
    assert "'0'" in capsys.readouterr().err


def test_sparsity_type_accepts_fractions() -> None:
    assert cli.sparsity("1/3") == pytest.approx(1 / 3)
    assert cli.sparsity("0") == 0.0
    assert cli.sparsity("0.25") == 0.25


def test_demo_arguments_are_passed_to_run_demo(monkeypatch, capsys) -> None:
    seen = {}

    def fake_run_demo(**kwargs):
        seen.update(kwargs)
        return DemoResult(
            dense=ModelMeasurements(parameters=1000, perplexity=20.0, tokens_per_second=10.0),
            pruned=ModelMeasurements(parameters=800, perplexity=30.0, tokens_per_second=12.0),
            prune_seconds=5.0,
            settings={"calibration": "x.txt", "eval": "first 2 windows"},
        )

    monkeypatch.setattr("osscar_hf.demo.run_demo", fake_run_demo)
    code = cli.main(["--log-level", "WARNING", "demo", "--attention-sparsity", "1/3", "--mlp-sparsity", "0.5",
                     "--num-samples", "4", "--eval-windows", "2"])
    assert code == 0
    assert seen["attention_sparsity"] == pytest.approx(1 / 3)
    assert seen["mlp_sparsity"] == 0.5
    assert seen["num_samples"] == 4
    assert seen["eval_windows"] == 2
    out = capsys.readouterr().out
    assert "| parameters" in out
    assert "80.0%" in out
    assert "1.50x" in out


def test_library_errors_exit_with_one_line(monkeypatch, capsys) -> None:
    from osscar_hf.errors import CalibrationDataError

    def failing_run_demo(**kwargs):
        raise CalibrationDataError("not enough calibration text")

    monkeypatch.setattr("osscar_hf.demo.run_demo", failing_run_demo)
    assert cli.main(["demo", "--no-throughput"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "osscar-hf: error: not enough calibration text"


def test_python_dash_m_help() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "osscar_hf", "demo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0
    assert "--attention-sparsity" in completed.stdout


def test_python_dash_m_bad_sparsity() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "osscar_hf", "demo", "--attention-sparsity", "1.2"],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2
    assert "'1.2'" in completed.stderr
    assert completed.stderr.strip().splitlines()[-1].startswith("osscar-hf demo: error:")


# --------------------------------------------------------------------------- prune / eval / push
# These run the commands end to end on a tiny random Llama saved in tmp, with a tiny calibration text.

PRUNE_OPTIONS = ["--attention-sparsity", "0.5", "--mlp-sparsity", "0.5", "--num-samples", "4", "--seq-len", "32",
                 "--batch-size", "2", "--device", "cpu"]


@pytest.fixture(autouse=True)
def mmap_threshold_calls(monkeypatch) -> list[int]:
    """``prune`` sets glibc's mmap threshold for its process; here that process is pytest's, so record the call
    instead of changing the allocator under the rest of the suite."""
    from osscar_hf import host_memory

    calls: list[int] = []

    def record(*args: object) -> bool:
        calls.append(1)
        host_memory._mapped = True  # as after a call that took effect (restored by monkeypatch below)
        return True

    monkeypatch.setattr(host_memory, "_mapped", host_memory._mapped)
    monkeypatch.setattr(host_memory, "map_large_allocations", record)
    return calls


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A dense tiny model folder (``src``), a calibration text and an evaluation text."""
    root = tmp_path_factory.mktemp("cli")
    make_model("llama-gqa", seed=1).save_pretrained(root / "src")
    make_tokenizer().save_pretrained(root / "src")
    make_model("opt", seed=1).save_pretrained(root / "src-opt")
    make_tokenizer().save_pretrained(root / "src-opt")
    (root / "calib.txt").write_text(make_text(1500, seed=2), encoding="utf-8")
    (root / "eval.txt").write_text(make_text(600, seed=3), encoding="utf-8")
    return root


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(argv: list[str]) -> int:
    return cli.main(["--log-level", "WARNING", *argv])


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("osscar-hf")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command, options", [
    ("prune", ["--attention-sparsity", "--mlp-sparsity", "--dataset", "--output", "--num-samples", "--seq-len",
               "--seed", "--device", "--batch-size", "--dtype", "--push-to-hub", "--eval", "--overwrite",
               "--format", "{auto,stock,osscar,remote-code}", "trust_remote_code=True"]),
    ("eval", ["--dataset", "--seq-len", "--max-windows", "--stride", "--batch-size", "--device", "--dtype"]),
    ("push", ["--private", "--token", "DIR", "REPO"]),
])
def test_subcommand_help(capsys, command, options) -> None:
    assert _exit_code([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: osscar-hf {command}")
    for option in options:
        assert option in out


def test_top_level_help_lists_every_command(capsys) -> None:
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("demo", "prune", "eval", "push"):
        assert command in out


@pytest.mark.parametrize("argv, fragment", [
    (["prune", "m", "--mlp-sparsity", "0.5", "--dataset", "d.txt", "--output", "o"], "--attention-sparsity"),
    (["prune", "m", "--attention-sparsity", "0.5", "--mlp-sparsity", "1.5", "--dataset", "d", "--output", "o"],
     "'1.5'"),
    (["prune", "m", "--attention-sparsity", "0", "--mlp-sparsity", "0.5", "--dataset", "d", "--output", "o",
      "--format", "gguf"], "invalid format 'gguf': expected one of auto, stock, osscar, remote-code"),
    (["eval", "m"], "--dataset"),
    (["eval", "m", "--dataset", "wikitext2", "--stride", "0"], "'0'"),
    (["eval", "m", "--dataset", "wikitext2", "--device", "tpu"], "'tpu'"),
    (["eval", "m", "--dataset", "wikitext2", "--dtype", "int8"], "'int8'"),
    (["push", "dir"], "REPO"),
])
def test_bad_arguments_exit_2_with_one_error_line(capsys, argv, fragment) -> None:
    assert _exit_code(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"osscar-hf {argv[0]}: error:")
    assert fragment in line


@pytest.mark.parametrize("kind, folder, stock", [("llama-gqa", "src", True), ("opt", "src-opt", False)])
def test_prune_writes_a_reloadable_model_folder(workdir, tmp_path, capsys, kind, folder, stock) -> None:
    """Llama with uniform shapes is a stock checkpoint; OPT with heads removed needs the osscar format."""
    out = tmp_path / "pruned"
    code = _run(["prune", str(workdir / folder), *PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt"),
                 "--output", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout
    for name in ("model.safetensors", "config.json", "osscar_report.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left behind
    report = json.loads((out / "osscar_report.json").read_text(encoding="utf-8"))
    assert report["parameters_after"] < report["parameters_before"]
    assert [b["attention"]["kept"] for b in report["blocks"]] == ([1, 1] if kind == "llama-gqa" else [2, 2])
    assert [b["mlp"]["kept"] for b in report["blocks"]] == [24, 24]
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert ("quantization_config" not in config) == stock

    # The saved weights are those of the same pruning done in memory.
    from osscar_hf import OsscarConfig, OsscarPruner

    config = OsscarConfig(0.5, 0.5, dataset=str(workdir / "calib.txt"), num_samples=4, seq_len=32, batch_size=2,
                          device="cpu")
    expected = OsscarPruner(config).prune(make_model(kind, seed=1), make_tokenizer(), progress=False)
    reloaded, _ = load_model_and_tokenizer(out, device="cpu")
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5)


def test_format_type_maps_remote_code_to_the_save_pruned_name() -> None:
    assert [cli.checkpoint_format(v) for v in ("auto", "stock", "osscar", "remote-code", "Remote_Code")] == [
        "auto", "stock", "osscar", "remote_code", "remote_code"]
    assert cli.build_parser().parse_args(["prune", "m", "--attention-sparsity", "0", "--mlp-sparsity", "0",
                                          "--dataset", "d", "--output", "o"]).format == "auto"


def test_prune_format_remote_code_loads_with_trust_remote_code(workdir, tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    from osscar_hf import OsscarConfig, OsscarPruner

    out = tmp_path / "rc"
    assert _run(["prune", str(workdir / "src-opt"), *PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt"),
                 "--output", str(out), "--format", "remote-code"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert {"configuration_osscar.py", "modeling_osscar.py", "model.safetensors", "tokenizer.json",
            "osscar_report.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "osscar_opt" and "quantization_config" not in config
    assert config["osscar_block_shapes"] == [{"num_attention_heads": 2, "num_key_value_heads": 2, "ffn_dim": 24}] * 2
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "trust_remote_code=True" in card and "import osscar_hf" not in card and "| 0 | 2 / 4 | 24 / 48 |" in card
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(reloaded).__name__ == "OsscarOPTForCausalLM"
    settings = OsscarConfig(0.5, 0.5, dataset=str(workdir / "calib.txt"), num_samples=4, seq_len=32, batch_size=2,
                            device="cpu")
    expected = OsscarPruner(settings).prune(make_model("opt", seed=1), make_tokenizer(), progress=False)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5)


def test_prune_format_stock_that_cannot_be_expressed_is_one_line(workdir, tmp_path, capsys) -> None:
    out = tmp_path / "stock"
    assert _run(["prune", str(workdir / "src-opt"), *PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt"),
                 "--output", str(out), "--format", "stock"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot save a stock checkpoint" in line and "derives head_dim" in line
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_prune_stream_refuses_an_impossible_format_before_any_work(workdir, tmp_path, capsys, monkeypatch) -> None:
    from osscar_hf.pipeline import BlockStream

    def no_pruning(*args, **kwargs):
        raise AssertionError("a block was pruned before the format was checked")

    monkeypatch.setattr(BlockStream, "prune", no_pruning)
    assert _run(["prune", str(workdir / "src-opt"), *PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt"),
                 "--output", str(tmp_path / "o"), "--stream", "--format", "stock"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot save a stock checkpoint" in line and "derives head_dim" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no partial folder, no lock file


def test_prune_stream_remote_code_format_matches_in_memory(workdir, tmp_path, capsys) -> None:
    calib = ["--dataset", str(workdir / "calib.txt"), "--format", "remote-code"]
    assert _run(["prune", str(workdir / "src-opt"), *PRUNE_OPTIONS, *calib, "--output", str(tmp_path / "mem")]) == 0
    assert _run(["prune", str(workdir / "src-opt"), *PRUNE_OPTIONS, *calib, "--output", str(tmp_path / "streamed"),
                 "--stream"]) == 0
    for name in ("configuration_osscar.py", "modeling_osscar.py"):
        assert (tmp_path / "streamed" / name).read_text() == (tmp_path / "mem" / name).read_text()
    mem_cfg = json.loads((tmp_path / "mem" / "config.json").read_text())
    streamed_cfg = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert streamed_cfg["model_type"] == "osscar_opt" and "quantization_config" not in streamed_cfg
    for key in ("auto_map", "architectures", "osscar_block_shapes", "osscar_layout", "ffn_dim", "num_attention_heads"):
        assert streamed_cfg[key] == mem_cfg[key], key
    assert "trust_remote_code=True" in (tmp_path / "streamed" / "README.md").read_text()
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "mem", trust_remote_code=True).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", trust_remote_code=True).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    # eval runs the shipped modeling code only when asked to.
    evaluate = ["eval", str(tmp_path / "streamed"), "--dataset", str(workdir / "eval.txt"), "--seq-len", "32",
                "--device", "cpu"]
    assert _run(evaluate) == 1
    assert "trust_remote_code" in _one_error_line(capsys.readouterr().err)
    assert _run([*evaluate, "--trust-remote-code", "--json", str(tmp_path / "ppl.json")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mem", trust_remote_code=True)
    _, tokenizer = load_model_and_tokenizer(workdir / "src-opt", device="cpu")
    expected = evaluate_perplexity(model, tokenizer, [(workdir / "eval.txt").read_text(encoding="utf-8")], seq_len=32)
    assert json.loads((tmp_path / "ppl.json").read_text())["perplexity"] == pytest.approx(expected.perplexity,
                                                                                          rel=1e-6)


def test_prune_with_eval_records_dense_and_pruned_perplexity(workdir, tmp_path, capsys) -> None:
    out = tmp_path / "pruned"
    code = _run(["prune", str(workdir / "src"), *PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt"),
                 "--output", str(out), "--eval", str(workdir / "eval.txt"), "--eval-seq-len", "64"])
    assert code == 0
    stdout = capsys.readouterr().out
    record = json.loads((out / "osscar_eval.json").read_text(encoding="utf-8"))
    texts = [(workdir / "eval.txt").read_text(encoding="utf-8")]
    dense_model, tokenizer = load_model_and_tokenizer(workdir / "src", device="cpu")
    pruned_model, _ = load_model_and_tokenizer(out, device="cpu")
    dense = evaluate_perplexity(dense_model, tokenizer, texts, seq_len=64)
    pruned = evaluate_perplexity(pruned_model, tokenizer, texts, seq_len=64)
    assert record["dense"]["perplexity"] == pytest.approx(dense.perplexity, rel=1e-6)
    assert record["pruned"]["perplexity"] == pytest.approx(pruned.perplexity, rel=1e-6)
    assert record["dense"]["num_tokens"] == record["pruned"]["num_tokens"] == dense.num_tokens
    assert f"dense perplexity  {dense.perplexity:.4f}" in stdout
    assert f"pruned perplexity {pruned.perplexity:.4f}" in stdout
    from huggingface_hub import ModelCard  # the model card carries both numbers

    card = ModelCard((out / "README.md").read_text(encoding="utf-8"))
    values = sorted(m["value"] for r in card.data.to_dict()["model-index"][0]["results"] for m in r["metrics"])
    assert values == sorted([round(dense.perplexity, 4), round(pruned.perplexity, 4)])


def test_prune_refuses_a_non_empty_output(workdir, tmp_path, capsys) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious", encoding="utf-8")
    before = _snapshot(out)
    code = _run(["prune", str(workdir / "src"), *PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt"),
                 "--output", str(out)])
    assert code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"osscar-hf: error: --output {out} is not empty; pass --overwrite to replace it"
    assert _snapshot(out) == before


def test_prune_overwrite_replaces_the_output(workdir, tmp_path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "stale.txt").write_text("old", encoding="utf-8")
    code = _run(["prune", str(workdir / "src"), *PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt"),
                 "--output", str(out), "--overwrite"])
    assert code == 0
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_prune_keeps_its_result_when_the_output_is_filled_during_the_run(workdir, tmp_path, capsys,
                                                                           monkeypatch) -> None:
    from osscar_hf.io import save

    out = tmp_path / "out"
    real = save.move_into_place

    def someone_writes_there_first(tmp: Path, dest: Path, *, overwrite: bool) -> None:
        if dest == out:  # (save_pruned's own move into the staging folder goes through too)
            dest.mkdir()
            (dest / "mine.txt").write_text("keep me", encoding="utf-8")
        real(tmp, dest, overwrite=overwrite)

    monkeypatch.setattr(save, "move_into_place", someone_writes_there_first)
    code = _run(["prune", str(workdir / "src"), *PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt"),
                 "--output", str(out)])
    assert code == 1
    line = _one_error_line(capsys.readouterr().err)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.osscar-pruned-")]
    assert len(kept) == 1 and f"the pruned checkpoint is in '{kept[0]}'" in line and "mine.txt" in line
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert (kept[0] / "model.safetensors").is_file() and (kept[0] / "osscar_report.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("extra, expected", [
    ([], {"resume": True, "dtype": None, "base_model": None}),
    (["--no-resume", "--dtype", "bfloat16", "--base-model", "me/dense"],
     {"resume": False, "dtype": "bfloat16", "base_model": "me/dense"}),
])
def test_prune_stream_passes_resume_dtype_and_base_model(workdir, tmp_path, monkeypatch, extra, expected) -> None:
    from osscar_hf.errors import OsscarError
    from osscar_hf.pruner import OsscarPruner

    seen: dict = {}

    def prune_checkpoint(self, source, output, **kwargs):
        seen.update(kwargs)
        raise OsscarError("stopped by the test")

    monkeypatch.setattr(OsscarPruner, "prune_checkpoint", prune_checkpoint)
    assert _run(["prune", str(workdir / "src"), *PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt"),
                 "--output", str(tmp_path / "out"), "--stream", *extra]) == 1
    assert {k: seen[k] for k in expected} == expected


@pytest.mark.parametrize("extra", [["--no-resume"], ["--revision", "main", "--delete-downloaded-shards"]])
def test_stream_only_options_need_stream(workdir, tmp_path, capsys, extra) -> None:
    assert _run(["prune", str(workdir / "src"), *PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt"),
                 "--output", str(tmp_path / "out"), *extra]) == 1
    line = _one_error_line(capsys.readouterr().err)
    named = [a for a in extra if a.startswith("--")]
    assert line == f"osscar-hf: error: {', '.join(named)} only apply with --stream (pruning a checkpoint block by " \
                   "block); add --stream, or leave them out"
    assert not (tmp_path / "out").exists()


def test_prune_and_eval_load_float32_unless_told(workdir, tmp_path, monkeypatch) -> None:
    from osscar_hf import metrics

    dtypes: list = []

    def load(model, **kwargs):
        dtypes.append(kwargs["dtype"])
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(metrics, "load_model_and_tokenizer", load)
    calib = ["--dataset", str(workdir / "calib.txt")]
    assert _run(["prune", str(workdir / "src"), *PRUNE_OPTIONS, *calib, "--output", str(tmp_path / "a")]) == 1
    assert _run(["prune", str(workdir / "src"), *PRUNE_OPTIONS, *calib, "--output", str(tmp_path / "b"),
                 "--dtype", "auto"]) == 1
    assert _run(["eval", str(workdir / "src"), "--dataset", str(workdir / "eval.txt"), "--device", "cpu"]) == 1
    assert dtypes == ["float32", "auto", "float32"]


@pytest.mark.parametrize("target", ["same", "same-spelled-differently", "parent"])
def test_prune_refuses_to_write_over_the_source(workdir, capsys, target) -> None:
    src = workdir / "src"
    output = {"same": src, "same-spelled-differently": src / ".." / "src", "parent": workdir}[target]
    before = _snapshot(workdir)
    code = _run(["prune", str(src), *PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt"),
                 "--output", str(output), "--overwrite"])
    assert code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"osscar-hf: error: --output {output} ")
    assert "source model" in line
    assert _snapshot(workdir) == before


def test_prune_bad_calibration_file_leaves_no_output(workdir, tmp_path, capsys) -> None:
    out = tmp_path / "pruned"
    code = _run(["prune", str(workdir / "src"), *PRUNE_OPTIONS, "--dataset", str(tmp_path / "missing.txt"),
                 "--output", str(out)])
    assert code == 1
    assert "missing.txt" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_eval_prints_the_perplexity_of_evaluate_perplexity(workdir, tmp_path, capsys) -> None:
    result_file = tmp_path / "result.json"
    code = _run(["eval", str(workdir / "src"), "--dataset", str(workdir / "eval.txt"), "--seq-len", "64",
                 "--device", "cpu", "--json", str(result_file)])
    assert code == 0
    stdout = capsys.readouterr().out
    model, tokenizer = load_model_and_tokenizer(workdir / "src", device="cpu")
    expected = evaluate_perplexity(model, tokenizer, [(workdir / "eval.txt").read_text(encoding="utf-8")],
                                   seq_len=64)
    assert f"perplexity {expected.perplexity:.4f} " in stdout
    saved = json.loads(result_file.read_text(encoding="utf-8"))
    assert saved["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert saved["num_tokens"] == expected.num_tokens


def test_eval_stride_and_max_windows(workdir, tmp_path, capsys) -> None:
    result_file = tmp_path / "result.json"
    assert _run(["eval", str(workdir / "src"), "--dataset", str(workdir / "eval.txt"), "--seq-len", "64",
                 "--stride", "16", "--max-windows", "3", "--batch-size", "2", "--device", "cpu",
                 "--json", str(result_file)]) == 0
    model, tokenizer = load_model_and_tokenizer(workdir / "src", device="cpu")
    expected = evaluate_perplexity(model, tokenizer, [(workdir / "eval.txt").read_text(encoding="utf-8")],
                                   seq_len=64, stride=16, max_windows=3)
    saved = json.loads(result_file.read_text(encoding="utf-8"))
    assert saved["num_windows"] == 3
    assert saved["num_tokens"] == expected.num_tokens
    assert saved["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)


def test_eval_missing_data_file_is_one_line(workdir, tmp_path, capsys) -> None:
    code = _run(["eval", str(workdir / "src"), "--dataset", str(tmp_path / "nope.txt")])
    assert code == 1
    assert "nope.txt" in _one_error_line(capsys.readouterr().err)


def test_push_uploads_the_folder(workdir, monkeypatch, capsys) -> None:
    calls = []

    def fake_push(folder, repo_id, **kwargs):
        calls.append((Path(folder), repo_id, kwargs))

    monkeypatch.setattr("osscar_hf.hub.push_pruned", fake_push)
    assert _run(["push", str(workdir / "src"), "me/tiny", "--private", "--token", "hf_x"]) == 0
    assert calls == [(workdir / "src", "me/tiny", {"token": "hf_x", "private": True})]
    assert "pushed" in capsys.readouterr().out


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "absent", "is not a folder"),
    (lambda root: root, "has no config.json"),
])
def test_push_refuses_a_non_model_folder(tmp_path, capsys, make, message) -> None:
    assert _run(["push", str(make(tmp_path)), "me/tiny"]) == 1
    assert message in _one_error_line(capsys.readouterr().err)


def test_push_refuses_a_bad_repo_id(workdir, capsys) -> None:
    assert _run(["push", str(workdir / "src"), "no-namespace"]) == 1
    assert "namespace/name" in _one_error_line(capsys.readouterr().err)


def test_prune_then_push_to_a_fake_hub(workdir, tmp_path, monkeypatch, capsys) -> None:
    from osscar_hf import hub as hub_module
    from tests.fake_hub import FakeHub

    out = tmp_path / "pruned"
    with FakeHub(tokens={"hf_alice": "alice"}) as hub:
        monkeypatch.setattr(hub_module, "push_pruned", functools.partial(hub_module.push_pruned, endpoint=hub.url))
        code = _run(["prune", str(workdir / "src"), *PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt"),
                     "--output", str(out), "--push-to-hub", "alice/tiny-osscar", "--token", "hf_alice"])
        assert code == 0, capsys.readouterr().err
        files = hub.files("alice/tiny-osscar")
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert files["osscar_report.json"] == (out / "osscar_report.json").read_bytes()
    assert files["README.md"] == (out / "README.md").read_bytes()
    assert "alice/tiny-osscar" in files["README.md"].decode()  # the card's loading snippet names the repo


@pytest.mark.parametrize("command", ["eval", "prune"])
def test_missing_local_model_folder_fails_fast(tmp_path, capsys, command) -> None:
    missing = str(tmp_path / "no-such-model")
    extra = (["--dataset", "wikitext2"] if command == "eval" else
             ["--attention-sparsity", "0.5", "--mlp-sparsity", "0.5", "--dataset", "c.txt", "--output",
              str(tmp_path / "out")])
    assert _run([command, missing, *extra]) == 1
    assert _one_error_line(capsys.readouterr().err) == f"osscar-hf: error: model folder {missing} does not exist"


def test_prune_stream_writes_the_same_model_as_in_memory(workdir, tmp_path, capsys) -> None:
    calib = ["--dataset", str(workdir / "calib.txt")]
    assert _run(["prune", str(workdir / "src-opt"), *PRUNE_OPTIONS, *calib, "--output", str(tmp_path / "mem")]) == 0
    acts = tmp_path / "acts"
    acts.mkdir()
    assert _run(["prune", str(workdir / "src-opt"), *PRUNE_OPTIONS, *calib, "--output", str(tmp_path / "streamed"),
                 "--stream", "--activation-storage", "disk", "--activation-dir", str(acts)]) == 0
    assert f"wrote {tmp_path / 'streamed'}" in capsys.readouterr().out
    assert list(acts.iterdir()) == []  # the on-disk activations were there, and are gone
    activations = json.loads((tmp_path / "streamed" / "osscar_report.json").read_text())["activations"]
    assert activations["storage"] == "disk" and activations["files_written"] > 0
    assert str(acts) not in (tmp_path / "streamed" / "README.md").read_text()
    for name in ("config.json", "osscar_report.json", "README.md", "tokenizer.json"):
        assert (tmp_path / "streamed" / name).is_file(), name
    mem, _ = load_model_and_tokenizer(tmp_path / "mem", device="cpu")
    streamed, _ = load_model_and_tokenizer(tmp_path / "streamed", device="cpu")
    a, b = mem.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prune_maps_large_allocations_for_its_process(workdir, tmp_path, mmap_threshold_calls) -> None:
    base = [*PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt")]
    assert _run(["prune", str(workdir / "src-opt"), *base, "--output", str(tmp_path / "a"), "--stream"]) == 0
    assert mmap_threshold_calls == [1]
    assert _run(["prune", str(workdir / "src-opt"), *base, "--output", str(tmp_path / "b")]) == 0
    assert mmap_threshold_calls == [1, 1]


def test_prune_stream_refuses_eval(workdir, tmp_path, capsys) -> None:
    base = [*PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt"), "--output", str(tmp_path / "o"), "--stream"]
    assert _run(["prune", str(workdir / "src"), *base, "--eval", str(workdir / "eval.txt")]) == 1
    assert "cannot be combined with --stream" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- sizes and methods
@pytest.mark.parametrize("argv, fragment", [
    (["prune", "m", "--dataset", "d", "--output", "o"], "give exactly one of --sparsity, --attention-sparsity"),
    (["prune", "m", "--sparsity", "0.3", "--mlp-sparsity", "0.5", "--dataset", "d", "--output", "o"],
     "(got --sparsity and --attention-sparsity/--mlp-sparsity)"),
    (["prune", "m", "--attention-sparsity", "0.3", "--dataset", "d", "--output", "o"],
     "--mlp-sparsity is required with --attention-sparsity"),
    (["prune", "m", "--sparsity", "0.3", "--output", "o"], "--dataset is required: method osscar calibrates"),
    (["prune", "m", "--attention-sparsity", "0", "--mlp-sparsity", "0.5", "--allocation", "global",
      "--dataset", "d", "--output", "o"], "--allocation applies to --sparsity"),
    (["prune", "m", "--sparsity", "0.3", "--method", "sparsegpt", "--dataset", "d", "--output", "o"],
     "invalid choice: 'sparsegpt'"),
    (["prune", "m", "--sparsity", "0.3", "--min-part-keep", "1.5", "--dataset", "d", "--output", "o"], "'1.5'"),
    (["prune", "m", "--attention-sparsity", "0.3", "--mlp-sparsity", "0.5", "--min-block-keep", "0.5",
      "--dataset", "d", "--output", "o"], "--min-block-keep apply to a global allocation"),
    (["prune", "m", "--sparsity", "0.3", "--allocation", "uniform", "--allocation-samples", "4",
      "--dataset", "d", "--output", "o"], "--allocation-samples apply to a global allocation"),
    (["prune", "m", "--attention-sparsity", "0.3", "--mlp-sparsity", "0.5", "--allocation-search", "4",
      "--dataset", "d", "--output", "o"], "--allocation-search apply to a global allocation"),
    (["prune", "m", "--sparsity", "0.3", "--allocation-search", "0", "--dataset", "d", "--output", "o"], "'0'"),
])
def test_bad_size_options_exit_2_with_one_line(capsys, argv, fragment) -> None:
    assert _exit_code(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("osscar-hf prune: error:") and fragment in line


def test_prune_with_a_global_sparsity_and_a_method(workdir, tmp_path, capsys) -> None:
    out = tmp_path / "pruned"
    code = _run(["prune", str(workdir / "src"), "--sparsity", "0.4", "--method", "flap", "--round-to", "8",
                 "--min-part-keep", "0.25", "--allocation-samples", "3", "--num-samples", "4", "--seq-len", "32",
                 "--batch-size", "2", "--device", "cpu", "--dataset", str(workdir / "calib.txt"), "--output", str(out)])
    assert code == 0
    report = json.loads((out / "osscar_report.json").read_text(encoding="utf-8"))
    assert report["config"]["method"] == "flap" and report["config"]["sparsity"] == 0.4
    assert report["config"]["allocation_samples"] == 3 and report["config"]["min_part_keep"] == 0.25
    assert report["budget"]["allocation"] == "flap" and report["config"]["round_to"] == 8
    assert all(b["mlp"]["kept"] % 8 == 0 for b in report["blocks"])
    loaded, _ = load_model_and_tokenizer(out, device="cpu")
    assert loaded.config.mlp_bias and loaded.config.attention_bias  # FLAP's compensation biases


def test_prune_with_the_allocation_search(workdir, tmp_path) -> None:
    out = tmp_path / "pruned"
    code = _run(["prune", str(workdir / "src"), "--sparsity", "0.4", "--allocation-search", "2",
                 "--allocation-samples", "2", "--num-samples", "4", "--seq-len", "32", "--batch-size", "2",
                 "--device", "cpu", "--dataset", str(workdir / "calib.txt"), "--output", str(out)])
    assert code == 0
    report = json.loads((out / "osscar_report.json").read_text(encoding="utf-8"))
    assert report["config"]["allocation_search"] == 2 and report["budget"]["allocation_search"]["candidates"] == 2


def test_prune_with_block_sizes_from_a_file_and_magnitude_without_data(workdir, tmp_path) -> None:
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps([{"attention": 2, "mlp": 40}, {"attention": 1, "mlp": 16}]), encoding="utf-8")
    out = tmp_path / "pruned"
    assert _run(["prune", str(workdir / "src"), "--block-sizes", str(sizes), "--method", "magnitude", "--device",
                 "cpu", "--output", str(out)]) == 0
    report = json.loads((out / "osscar_report.json").read_text(encoding="utf-8"))
    assert [(b["attention"]["kept"], b["mlp"]["kept"]) for b in report["blocks"]] == [(2, 40), (1, 16)]
    assert report["calibration"]["tokens"] == 0


def test_unreadable_block_sizes_file_is_one_line(workdir, tmp_path, capsys) -> None:
    assert _run(["prune", str(workdir / "src"), "--block-sizes", str(tmp_path / "missing.json"), "--method",
                 "magnitude", "--output", str(tmp_path / "out")]) == 1
    assert "cannot read --block-sizes" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("sizes", [["--sparsity", "0.3"],
                                   ["--block-sizes", '[{"attention": 1, "mlp": 8}, {"attention": 2, "mlp": 8}]']])
def test_prune_refuses_stock_for_per_block_sizes_before_loading(workdir, tmp_path, capsys, monkeypatch, sizes):
    import osscar_hf.metrics

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the format was checked")

    monkeypatch.setattr(osscar_hf.metrics, "load_model_and_tokenizer", no_loading)
    assert _run(["prune", str(workdir / "src"), *sizes, "--dataset", str(workdir / "calib.txt"),
                 "--output", str(tmp_path / "o"), "--format", "stock"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "--format stock cannot hold" in line and "--format auto" in line
    assert not (tmp_path / "o").exists()


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the CLI loads a model's weights."""
    import osscar_hf.metrics

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(osscar_hf.metrics, "load_model_and_tokenizer", refuse)


def test_prune_refuses_a_missing_calibration_file_before_loading(workdir, tmp_path, capsys, no_loading) -> None:
    missing = tmp_path / "missing.txt"
    assert _run(["prune", str(workdir / "src"), *PRUNE_OPTIONS, "--dataset", str(missing),
                 "--output", str(tmp_path / "o")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"calibration file {str(missing)!r} does not exist" in line


def test_prune_refuses_an_unsupported_model_type_before_loading(workdir, tmp_path, capsys, no_loading) -> None:
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(folder)  # config.json only: no weights at all
    assert _run(["prune", str(folder), *PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt"),
                 "--output", str(tmp_path / "o")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "does not support model_type 'gpt2'" in line and "llama" in line


def test_prune_refuses_an_already_pruned_model_before_loading(workdir, tmp_path, capsys, no_loading) -> None:
    config = json.loads((workdir / "src" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "osscar", "attention_sparsity": 0.5, "mlp_sparsity": 0.5}
    folder = tmp_path / "pruned"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    assert _run(["prune", str(folder), *PRUNE_OPTIONS, "--dataset", str(workdir / "calib.txt"),
                 "--output", str(tmp_path / "o")]) == 1
    assert "already pruned by osscar_hf" in _one_error_line(capsys.readouterr().err)


def test_prune_refuses_query_heads_for_a_model_without_gqa_before_loading(workdir, tmp_path, capsys,
                                                                         no_loading) -> None:
    from transformers import LlamaConfig

    folder = tmp_path / "mha"
    LlamaConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, num_key_value_heads=2).save_pretrained(
        folder)  # config.json only: no weights at all
    assert _run(["prune", str(folder), *PRUNE_OPTIONS, "--attention-structure", "query_heads", "--dataset",
                 str(workdir / "calib.txt"), "--output", str(tmp_path / "o")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "one query head per KV head" in line and "attention_structure='kv_groups'" in line


@pytest.mark.parametrize("options, refused", [
    (["--attention-sparsity", "0.5", "--mlp-sparsity", "0.5"],
     "attention_sparsity=0.5: the attention of spec 'olmoe' cannot be pruned"),
    (["--attention-sparsity", "0", "--mlp-sparsity", "0.5", "--method", "flap"],
     "method='flap' compensates with an output bias"),
])
def test_prune_refuses_what_a_family_cannot_take_before_loading(options, refused, workdir, tmp_path, capsys,
                                                                no_loading) -> None:
    from transformers import OlmoeConfig

    folder = tmp_path / "olmoe"
    OlmoeConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8,
                num_experts=2).save_pretrained(folder)  # config.json only: no weights at all
    assert _run(["prune", str(folder), *options, "--dataset", str(workdir / "calib.txt"), "--output",
                 str(tmp_path / "o")]) == 1
    assert refused in _one_error_line(capsys.readouterr().err)


def test_prune_with_query_heads_keeps_every_kv_head(workdir, tmp_path) -> None:
    out = tmp_path / "pruned"
    assert _run(["prune", str(workdir / "src"), "--attention-sparsity", "0.5", "--mlp-sparsity", "0.25",
                 "--attention-structure", "query_heads", "--dataset", str(workdir / "calib.txt"), "--num-samples",
                 "4", "--seq-len", "16", "--device", "cpu", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    report = json.loads((out / "osscar_report.json").read_text(encoding="utf-8"))
    assert report["config"]["attention_structure"] == "query_heads"
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 2)
