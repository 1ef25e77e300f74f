"""How a streamed run ends, and its output options.

A folder that appears at the output while the run writes is never replaced; a failure while the checkpoint is being
finished keeps the finished blocks for the rerun; ``dtype=`` gives what ``prune`` gives on a model loaded in that
dtype; ``base_model=`` names the card's base model; a tied head stored twice in the source is written once, as the
embedding (as ``save_pretrained`` writes it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from osscar_hf import OsscarPruner, save_pruned
from osscar_hf.io.save import OutputConflictError
from osscar_hf.streaming import (
    INDEX_NAME,
    PROGRESS_NAME,
    ResumeError,
    partial_folder,
    run,
)
from osscar_hf.pipeline import orchestrate
from tests.conftest import make_model
from tests.integration.test_streaming import (
    _checkpoint,
    _config,
    _interrupt_at,
    _tensors,
)


@pytest.fixture
def source(tmp_path, tokenizer) -> Path:
    return _checkpoint(tmp_path / "dense", "opt", {"num_hidden_layers": 2}, {"max_shard_size": "20KB"}, tokenizer)


def _same_tensors(a: Path, b: Path) -> None:
    x, y = _tensors(a), _tensors(b)
    assert set(x) == set(y)
    for key in x:
        assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


def _finishes_without_solving(monkeypatch, config, source: Path, target: Path, reference: Path) -> None:
    """The same call again: no block is solved, and as every block is finished no calibration input is computed
    either; the output is the uninterrupted run's."""
    from osscar_hf import capture as capture_module
    from osscar_hf.pipeline import BlockStream

    calls: list[int] = []
    _interrupt_at(monkeypatch, -1, calls)
    forwards: list[str] = []
    monkeypatch.setattr(capture_module, "capture_block_inputs", lambda *a, **k: forwards.append("capture"))
    monkeypatch.setattr(BlockStream, "replay", lambda *a, **k: forwards.append("replay"))
    pruner = OsscarPruner(config)
    pruner.prune_checkpoint(source, target, progress=False)
    assert calls == [] and forwards == []
    assert pruner.report.parameters_after < pruner.report.parameters_before and len(pruner.report.blocks) == 2
    assert not partial_folder(target.absolute()).exists() and not (target / PROGRESS_NAME).exists()
    _same_tensors(reference, target)
    assert (target / "config.json").read_text() == (reference / "config.json").read_text()
    assert (target / INDEX_NAME).read_text() == (reference / INDEX_NAME).read_text()


def test_a_folder_that_appears_at_the_output_during_the_run_is_not_replaced(source, tmp_path, calibration_texts,
                                                                              monkeypatch):
    config = _config(calibration_texts, (0.5, 0.5))
    reference = OsscarPruner(config).prune_checkpoint(source, tmp_path / "reference", progress=False)
    target = tmp_path / "out"
    real = run.move_into_place

    def someone_writes_there_first(tmp: Path, dest: Path, *, overwrite: bool) -> None:
        dest.mkdir()
        (dest / "mine.txt").write_text("keep me")
        real(tmp, dest, overwrite=overwrite)

    monkeypatch.setattr(run, "move_into_place", someone_writes_there_first)
    with pytest.raises(OutputConflictError, match=r"refusing to replace .*out.*mine\.txt.*kept in .*\.out\.osscar-"
                                                  r"partial.*move .*out' away \(or pass overwrite=True\)"):
        OsscarPruner(config).prune_checkpoint(source, target, progress=False)
    assert os.listdir(target) == ["mine.txt"] and (target / "mine.txt").read_text() == "keep me"
    partial = partial_folder(target.absolute())
    assert (partial / PROGRESS_NAME).is_file() and (partial / "config.json").is_file()
    # The user moves their folder away; the same call then finishes from the kept blocks.
    monkeypatch.setattr(run, "move_into_place", real)
    shutil.rmtree(target)
    _finishes_without_solving(monkeypatch, config, source, target, reference)


def test_an_empty_folder_at_the_output_is_used(source, tmp_path, calibration_texts):
    config = _config(calibration_texts, (0.5, 0.5))
    (tmp_path / "out").mkdir()
    out = OsscarPruner(config).prune_checkpoint(source, tmp_path / "out", progress=False)
    assert (out / INDEX_NAME).is_file()


def test_a_failure_while_finishing_keeps_the_finished_blocks(source, tmp_path, calibration_texts, monkeypatch):
    config = _config(calibration_texts, (0.5, 0.5))
    reference = OsscarPruner(config).prune_checkpoint(source, tmp_path / "reference", progress=False)
    target = tmp_path / "out"

    def interrupted(folder: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "fsync_tree", interrupted)  # the last step before the rename
    with pytest.raises(KeyboardInterrupt):
        OsscarPruner(config).prune_checkpoint(source, target, progress=False)
    assert not target.exists()
    partial = partial_folder(target.absolute())
    progress = json.loads((partial / PROGRESS_NAME).read_text())
    assert len(progress["blocks"]) == 2 and all((partial / b["shard"]).is_file() for b in progress["blocks"])
    monkeypatch.undo()
    _finishes_without_solving(monkeypatch, config, source, target, reference)


# --------------------------------------------------------------------------- dtype
@pytest.fixture
def bf16_source(tmp_path, tokenizer) -> Path:
    folder = tmp_path / "dense-bf16"
    make_model("llama-gqa", num_hidden_layers=2).to(torch.bfloat16).save_pretrained(folder, max_shard_size="20KB")
    tokenizer.save_pretrained(folder)
    return folder


def test_dtype_gives_what_prune_gives_on_the_model_loaded_in_it(bf16_source, tmp_path, tokenizer, calibration_texts):
    config = _config(calibration_texts, (0.5, 0.5))
    model = AutoModelForCausalLM.from_pretrained(bf16_source, dtype=torch.float32)
    OsscarPruner(config).prune(model, tokenizer, progress=False)
    saved = save_pruned(model, tmp_path / "saved", tokenizer=tokenizer)
    out = OsscarPruner(config).prune_checkpoint(bf16_source, tmp_path / "float32", progress=False, dtype="float32")
    assert json.loads((out / "config.json").read_text()) == json.loads((saved / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    expected = model.state_dict()
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == torch.float32 and torch.equal(got[key], tensor), key
    # By default the checkpoint's own dtype is kept.
    kept = OsscarPruner(config).prune_checkpoint(bf16_source, tmp_path / "kept", progress=False)
    assert {t.dtype for t in _tensors(kept).values()} == {torch.bfloat16}
    assert json.loads((kept / "config.json").read_text())["dtype"] == "bfloat16"


def test_dtype_is_part_of_what_a_resume_must_match(bf16_source, tmp_path, calibration_texts, monkeypatch):
    config = _config(calibration_texts, (0.5, 0.5))
    target = tmp_path / "out"
    _interrupt_at(monkeypatch, 1, [])
    with pytest.raises(KeyboardInterrupt):
        OsscarPruner(config).prune_checkpoint(bf16_source, target, progress=False, dtype=torch.float32)
    with pytest.raises(ResumeError, match=r"dtype: 'float32' -> None"):
        OsscarPruner(config).prune_checkpoint(bf16_source, target, progress=False)


@pytest.mark.parametrize("dtype, message", [("int8", r"float32.*got 'int8'"),
                                            (torch.int8, r"float32, bfloat16, float16 or 'auto'.*got torch\.int8"),
                                            (torch.float64, r"float32, bfloat16, float16 or 'auto'.*got torch\.float64")])
def test_a_bad_dtype_is_refused_before_any_work(source, tmp_path, calibration_texts, dtype, message):
    with pytest.raises(ValueError, match=message):
        OsscarPruner(_config(calibration_texts, (0.5, 0.5))).prune_checkpoint(source, tmp_path / "out", dtype=dtype)
    assert sorted(os.listdir(tmp_path)) == ["dense"]


# --------------------------------------------------------------------------- card and tied head
def test_base_model_names_the_cards_base_model(source, tmp_path, calibration_texts):
    out = OsscarPruner(_config(calibration_texts, (0.5, 0.5))).prune_checkpoint(
        source, tmp_path / "out", progress=False, base_model="someone/dense-model")
    assert "base_model: someone/dense-model" in (out / "README.md").read_text()
    plain = OsscarPruner(_config(calibration_texts, (0.5, 0.5))).prune_checkpoint(source, tmp_path / "plain",
                                                                                  progress=False)
    assert "base_model:" not in (plain / "README.md").read_text()


def test_a_tied_head_stored_twice_is_written_once_as_the_embedding(tmp_path, tokenizer, calibration_texts):
    model = make_model("llama-gqa", num_hidden_layers=2, tie_word_embeddings=True)
    folder = tmp_path / "dense"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Rewrite the weights with both keys stored, the head listed first in the index.
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in state and "model.embed_tokens.weight" in state
    (folder / "model.safetensors").unlink()
    save_file({"lm_head.weight": state.pop("lm_head.weight")}, str(folder / "model-00001-of-00002.safetensors"),
              metadata={"format": "pt"})
    save_file(state, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {"lm_head.weight": "model-00001-of-00002.safetensors",
                  **dict.fromkeys(state, "model-00002-of-00002.safetensors")}
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = _config(calibration_texts, (0.5, 0.5))
    out = OsscarPruner(config).prune_checkpoint(folder, tmp_path / "out", progress=False)
    in_memory = AutoModelForCausalLM.from_pretrained(folder)
    OsscarPruner(config).prune(in_memory, tokenizer, progress=False)
    saved = save_pruned(in_memory, tmp_path / "saved")
    written = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    assert "model.embed_tokens.weight" in written and "lm_head.weight" not in written
    stored: set[str] = set()
    for shard in saved.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            stored.update(handle.keys())
    assert set(written) == stored
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


# --------------------------------------------------------------------------- progress
class _Bar:
    """Stands in for tqdm: records what the run shows."""

    made: ClassVar[list[_Bar]] = []

    def __init__(self, *, total: int, initial: int = 0, **kwargs) -> None:
        self.total, self.initial, self.n, self.shown = total, initial, initial, []
        _Bar.made.append(self)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, postfix: dict) -> None:
        self.shown.append(dict(postfix))

    def set_postfix_str(self, text: str) -> None:
        self.shown.append(text)

    def close(self) -> None:
        pass


def test_progress_starts_after_the_finished_blocks_and_shows_memory(source, tmp_path, calibration_texts, monkeypatch,
                                                                   caplog):
    config = _config(calibration_texts, (0.5, 0.5))
    target = tmp_path / "out"
    monkeypatch.setattr(orchestrate, "tqdm", _Bar)
    _Bar.made.clear()
    _interrupt_at(monkeypatch, 1, [])
    with pytest.raises(KeyboardInterrupt):
        OsscarPruner(config).prune_checkpoint(source, target, progress=False)
    _interrupt_at(monkeypatch, -1, [])
    with caplog.at_level("INFO", logger="osscar_hf.pipeline"):
        pruner = OsscarPruner(config)
        pruner.prune_checkpoint(source, target, progress=False)
    first_replay, first, replay, resumed = _Bar.made
    assert (first_replay.total, first_replay.n) == (0, 0) and (first.initial, first.n) == (0, 1)
    assert (replay.total, replay.n) == (1, 1)  # block 0's outputs, recomputed
    assert (resumed.total, resumed.initial, resumed.n) == (2, 1, 2)  # block 0 is not counted as this run's work
    block1 = resumed.shown[0]
    assert set(block1) >= {"s", "attn_err", "mlp_err"}
    peak = pruner.report.blocks[1].peak_host_rss_bytes
    if peak is not None:  # Linux (VmHWM) and getrusage platforms
        assert block1["rss"] == f"{peak / 2**30:.2f}G"
        assert "block 1: attention" in caplog.text and f"peak RSS {block1['rss']}iB" in caplog.text
    assert pruner.report.blocks[1].peak_device_memory_bytes is None and "dev" not in block1  # CPU: no device peak


# --------------------------------------------------------------------------- CUDA
def test_the_gpu_model_is_part_of_what_a_resume_must_match(source, calibration_texts, monkeypatch):
    """Another GPU model may round differently: a partial run from one is not continued on another."""
    from osscar_hf.streaming import LocalFiles, ShardReader
    from osscar_hf.streaming.resume import run_fingerprint

    files, windows = LocalFiles(source), torch.zeros(2, 8, dtype=torch.long)
    reader, pruner = ShardReader(files), OsscarPruner(_config(calibration_texts, (0.5, 0.5)))
    names = iter(["GPU model A", "GPU model A", "GPU model B"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: next(names))
    a, same, b = (run_fingerprint(files, reader, pruner.config, windows, torch.device("cuda:0")) for _ in range(3))
    assert a == same and a["device"] == "cuda:0 (GPU model A)" and b["device"] == "cuda:0 (GPU model B)"
    assert run_fingerprint(files, reader, pruner.config, windows, torch.device("cpu"))["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streaming_on_cuda_releases_each_block_and_resumes_identically(tmp_path, tokenizer, calibration_texts,
                                                                        monkeypatch):
    """The blocks are solved on the GPU, the activations stay on the host, nothing stays on the device, and a resumed
    run gives the uninterrupted run's tensors."""
    source = _checkpoint(tmp_path / "dense", "llama-gqa", {"num_hidden_layers": 3}, {"max_shard_size": "20KB"},
                         tokenizer)
    config = _config(calibration_texts, (0.5, 0.5))
    config.device = "cuda"
    before = torch.cuda.memory_allocated()
    pruner = OsscarPruner(config)
    reference = pruner.prune_checkpoint(source, tmp_path / "reference", progress=False)
    assert torch.cuda.memory_allocated() == before
    assert all(b.peak_device_memory_bytes and b.peak_device_memory_bytes > 0 for b in pruner.report.blocks)
    loaded = AutoModelForCausalLM.from_pretrained(reference)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    target = tmp_path / "out"
    _interrupt_at(monkeypatch, 2, [])
    with pytest.raises(KeyboardInterrupt):
        OsscarPruner(config).prune_checkpoint(source, target, progress=False)
    assert torch.cuda.memory_allocated() == before
    calls: list[int] = []
    _interrupt_at(monkeypatch, -1, calls)
    OsscarPruner(config).prune_checkpoint(source, target, progress=False)
    assert calls == [2]
    _same_tensors(reference, target)


def test_a_symbolic_link_at_the_output_is_written_through(source, tmp_path, calibration_texts):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    out = OsscarPruner(_config(calibration_texts, (0.5, 0.5))).prune_checkpoint(source, tmp_path / "link",
                                                                                progress=False)
    assert out == (tmp_path / "real").absolute()
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / INDEX_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "link", "real"]
