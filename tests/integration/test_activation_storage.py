"""Calibration activations on disk (``OsscarConfig.activation_storage``): the same pruning, bit for bit, as in
memory; files of finished blocks deleted as the loop goes; the folder removed at the end, also on errors; and
``"auto"`` choosing disk when the loop would not fit in memory."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from osscar_hf import OsscarConfig, OsscarPruner
from osscar_hf.methods import osscar as osscar_method
from osscar_hf import activations as act
from osscar_hf.errors import SolverError
from osscar_hf.pipeline import BlockStream
from tests.conftest import make_model

SMALL = dict(num_samples=8, seq_len=32, batch_size=4, device="cpu")  # 2 batches per stream
BATCHES = 2


def _config(texts, **overrides) -> OsscarConfig:
    return OsscarConfig(**{"attention_sparsity": 0.5, "mlp_sparsity": 0.5, "dataset": texts, **SMALL, **overrides})


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def _leftovers(folder: Path) -> list[str]:
    """Activation folders left in ``folder`` (other libraries may put their own things in the temp dir)."""
    return [p.name for p in folder.iterdir() if p.name.startswith(act.FOLDER_PREFIX)]


@pytest.fixture
def temp_dir(tmp_path, monkeypatch) -> Path:
    """tempfile.gettempdir() for the test: where activation folders go by default."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.mark.parametrize(("kind", "options", "streams"), [
    ("opt", dict(propagate=True), 2),
    ("llama-gqa", dict(propagate=False), 2),
    ("opt", dict(dense_targets=True), 4),
])
def test_disk_gives_the_memory_result_bit_for_bit(kind, options, streams, tokenizer, calibration_texts, temp_dir,
                                                  monkeypatch):
    memory_model = make_model(kind)
    memory = OsscarPruner(_config(calibration_texts, activation_storage="memory", **options))
    memory.prune(memory_model, tokenizer, progress=False)

    # After every block only the next block's inputs are left on disk (the previous generation is deleted).
    files_after_block: list[int] = []
    real_prune = BlockStream.prune

    def prune(self, index, block):
        report = real_prune(self, index, block)
        files_after_block.append(len(list(self.space.folder.iterdir())))
        return report

    monkeypatch.setattr(BlockStream, "prune", prune)
    disk_model = make_model(kind)
    disk = OsscarPruner(_config(calibration_texts, activation_storage="disk", **options))
    disk.prune(disk_model, tokenizer, progress=False)

    _assert_same_weights(memory_model, disk_model)
    assert memory_model.config.to_dict() == disk_model.config.to_dict()
    assert [(b.attention.kept_indices, b.mlp.kept_indices) for b in memory.report.blocks] == [
        (b.attention.kept_indices, b.mlp.kept_indices) for b in disk.report.blocks]
    stream_bytes = SMALL["num_samples"] * SMALL["seq_len"] * memory_model.config.hidden_size * 4
    assert memory.report.activations == {"storage": "memory", "requested": "memory", "stream_bytes": stream_bytes}
    assert disk.report.activations["storage"] == "disk"
    assert disk.report.activations["peak_disk_bytes"] == streams * stream_bytes
    # Block 0's inputs (shared by the dense stream), then every block's outputs on each stream.
    blocks = memory_model.config.num_hidden_layers
    assert disk.report.activations["files_written"] == BATCHES * (1 + blocks * streams // 2)
    assert files_after_block == [BATCHES * streams // 2] * blocks
    assert not _leftovers(temp_dir)  # the folder is gone


def test_activation_dir_is_used_and_emptied(tmp_path, tokenizer, calibration_texts, temp_dir, monkeypatch):
    folders: list[Path] = []
    real_prune = BlockStream.prune

    def prune(self, index, block):
        folders.append(self.space.folder)
        return real_prune(self, index, block)

    monkeypatch.setattr(BlockStream, "prune", prune)
    target = tmp_path / "activations" / "here"
    OsscarPruner(_config(calibration_texts, activation_storage="disk", activation_dir=str(target))).prune(
        make_model("llama-gqa"), tokenizer, progress=False)
    assert folders and all(f.parent == target for f in folders)
    assert target.is_dir() and not list(target.iterdir()) and not _leftovers(temp_dir)


@pytest.mark.parametrize("fail_at", [1, 3])  # block 0's attention solve; block 1's attention solve
def test_folder_is_removed_when_pruning_fails(fail_at, tokenizer, calibration_texts, temp_dir, monkeypatch):
    real_solve, calls = osscar_method.solve_layer, []

    def failing_solve(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise SolverError("injected failure")
        return real_solve(*args, **kwargs)

    monkeypatch.setattr(osscar_method, "solve_layer", failing_solve)
    with pytest.raises(SolverError, match="injected"):
        OsscarPruner(_config(calibration_texts, activation_storage="disk", dense_targets=True)).prune(
            make_model("opt"), tokenizer, progress=False)
    assert len(calls) == fail_at
    assert not _leftovers(temp_dir)


def test_folder_is_removed_when_the_capture_fails(tokenizer, calibration_texts, temp_dir, monkeypatch):
    from osscar_hf import capture

    real_share, calls = capture._share_equal, []

    def failing(obj, seen):
        calls.append(1)
        if len(calls) == 3:  # the second batch, after the first batch's activations were written
            raise KeyboardInterrupt
        return real_share(obj, seen)

    monkeypatch.setattr(capture, "_share_equal", failing)
    with pytest.raises(KeyboardInterrupt):
        OsscarPruner(_config(calibration_texts, activation_storage="disk")).prune(
            make_model("opt"), tokenizer, progress=False)
    assert not _leftovers(temp_dir)


@pytest.mark.parametrize(("available", "expected"), [(1000, "disk"), (10**15, "memory"), (None, "memory")])
def test_auto_chooses_disk_above_the_threshold(available, expected, tokenizer, calibration_texts, temp_dir,
                                               monkeypatch, caplog):
    monkeypatch.setattr(act, "available_memory_bytes", lambda: available)
    model = make_model("opt")
    pruner = OsscarPruner(_config(calibration_texts))  # activation_storage="auto" by default
    with caplog.at_level(logging.INFO, logger="osscar_hf.activations"):
        pruner.prune(model, tokenizer, progress=False)
    assert pruner.report.activations["storage"] == expected
    assert pruner.report.activations["requested"] == "auto"
    where = "on disk" if expected == "disk" else "in memory"
    assert f"calibration activations {where} (activation_storage='auto'" in caplog.text
    assert "up to 2 streams of 0.03 MiB = 0.06 MiB" in caplog.text  # 8 x 32 x 32 float32 = 32 KiB per stream
    assert not _leftovers(temp_dir)


def test_report_records_the_storage_in_json(tmp_path, tokenizer, calibration_texts, temp_dir):
    pruner = OsscarPruner(_config(calibration_texts, activation_storage="disk"))
    pruner.prune(make_model("opt"), tokenizer, progress=False)
    data = json.loads(pruner.report.to_json(tmp_path / "report.json").read_text())
    assert data["activations"]["storage"] == "disk" and data["activations"]["peak_disk_bytes"] > 0
    assert data["config"]["activation_storage"] == "disk"


def test_streaming_with_disk_activations_matches_memory(tmp_path, tokenizer, calibration_texts, temp_dir,
                                                        monkeypatch):
    on_disk: list[bool] = []
    real_prune = BlockStream.prune

    def prune(self, index, block):
        on_disk.append(self.space.on_disk)
        return real_prune(self, index, block)

    monkeypatch.setattr(BlockStream, "prune", prune)
    source = tmp_path / "dense"
    make_model("llama-gqa", num_hidden_layers=3).save_pretrained(source, max_shard_size="20KB")
    tokenizer.save_pretrained(source)
    outputs = {}
    for storage in ("memory", "disk"):
        pruner = OsscarPruner(_config(calibration_texts, activation_storage=storage, dense_targets=True))
        outputs[storage] = pruner.prune_checkpoint(source, tmp_path / storage, progress=False)
    assert on_disk == [False] * 3 + [True] * 3
    memory, disk = (AutoModelForCausalLM.from_pretrained(outputs[s]) for s in ("memory", "disk"))
    _assert_same_weights(memory, disk)
    assert (outputs["memory"] / "config.json").read_text() == (outputs["disk"] / "config.json").read_text()
    assert json.loads((outputs["disk"] / "osscar_report.json").read_text())["config"]["activation_storage"] == "disk"
    assert not _leftovers(temp_dir)
