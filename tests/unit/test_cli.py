"""Tests of the osscar-hf command line (argument parsing only: nothing is downloaded or pruned)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from osscar_hf import cli
from osscar_hf.demo import DemoResult, ModelMeasurements


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
