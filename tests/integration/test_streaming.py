"""Streaming pruning of a checkpoint from disk, block by block (``OsscarPruner.prune_checkpoint``).

The streamed result must be the in-memory result: the same tensors, bit for bit, the same logits after
``from_pretrained``, the same config.json as ``save_pruned`` writes; and only one block is ever materialised.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import osscar_hf  # noqa: F401 - registers the osscar quantizer
from osscar_hf import OsscarConfig, OsscarPruner, save_pruned
from osscar_hf.arch import get_spec
from osscar_hf.errors import OsscarError, UnsupportedModelError
from osscar_hf.io import SaveError
from osscar_hf.pipeline import BlockStream
from osscar_hf.streaming import (
    INDEX_NAME,
    PROGRESS_NAME,
    REPORT_NAME,
    CheckpointError,
    ConcurrentRunError,
    LocalFiles,
    ResumeError,
    ShardReader,
    lock_file,
    partial_folder,
)
from osscar_hf.streaming.resume import run_fingerprint
from tests.conftest import VOCAB, interrupt_at, make_model

ROOT = Path(__file__).resolve().parents[2]

SMALL = dict(num_samples=8, seq_len=32, batch_size=4, device="cpu")
IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
# (model kind, config overrides, save_pretrained kwargs, sparsities (attention, mlp))
CASES = {
    "opt-sharded": ("opt", {}, {"max_shard_size": "20KB"}, (0.5, 0.5)),                     # osscar format
    "llama-gqa-tied-sharded": ("llama-gqa", {"tie_word_embeddings": True}, {"max_shard_size": "20KB"}, (0.5, 0.5)),
    "llama-gqa-single-file": ("llama-gqa", {"num_hidden_layers": 3}, {}, (0.0, 0.5)),     # stock format
    "qwen3-sharded": ("qwen3", {}, {"max_shard_size": "20KB"}, (0.5, 0.5)),
    "gemma-tied-sharded": ("gemma", {}, {"max_shard_size": "20KB"}, (0.5, 0.5)),
    "gemma2-tied-sharded": ("gemma2", {}, {"max_shard_size": "20KB"}, (0.5, 0.5)),
    "gemma3-text-tied-sharded": ("gemma3-text", {}, {"max_shard_size": "20KB"}, (0.5, 0.5)),
}


def _config(texts: list[str], sparsities: tuple[float, float]) -> OsscarConfig:
    return OsscarConfig(attention_sparsity=sparsities[0], mlp_sparsity=sparsities[1], dataset=texts, **SMALL)


def _checkpoint(folder: Path, kind: str, overrides: dict, save_kwargs: dict, tokenizer) -> Path:
    make_model(kind, **overrides).save_pretrained(folder, **save_kwargs)
    tokenizer.save_pretrained(folder)
    return folder


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module", params=sorted(CASES))
def streamed(request, tmp_path_factory, tokenizer, calibration_texts):
    """(case, source folder, in-memory pruned model and its pruner, streamed folder and its pruner)."""
    kind, overrides, save_kwargs, sparsities = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    source = _checkpoint(root / "dense", kind, overrides, save_kwargs, tokenizer)
    memory_pruner = OsscarPruner(_config(calibration_texts, sparsities))
    model = AutoModelForCausalLM.from_pretrained(source)
    memory_pruner.prune(model, tokenizer, progress=False)
    stream_pruner = OsscarPruner(_config(calibration_texts, sparsities))
    out = stream_pruner.prune_checkpoint(source, root / "streamed", progress=False)
    return request.param, source, model, memory_pruner, out, stream_pruner


def test_streamed_tensors_and_logits_are_the_in_memory_ones(streamed):
    case, source, model, _, out, _ = streamed
    assert out == (source.parent / "streamed").absolute()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert torch.equal(_logits(loaded), _logits(model))
    if "tied" in case:
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def test_streamed_checkpoint_is_what_save_pruned_writes(streamed, tmp_path, tokenizer):
    case, source, model, memory_pruner, out, stream_pruner = streamed
    saved = save_pruned(model, tmp_path / "saved", tokenizer=tokenizer)
    assert json.loads((out / "config.json").read_text()) == json.loads((saved / "config.json").read_text())
    has_qc = "quantization_config" in json.loads((out / "config.json").read_text())
    assert has_qc == (case == "opt-sharded")  # OPT with heads removed needs the osscar format
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    # The index lists every tensor once, in shards that exist and hold exactly those tensors.
    index = json.loads((out / INDEX_NAME).read_text())
    by_shard: dict[str, set[str]] = {}
    for tensor, shard in index["weight_map"].items():
        by_shard.setdefault(shard, set()).add(tensor)
    assert len(by_shard) == model.config.num_hidden_layers + 1
    size = 0
    for shard, names in by_shard.items():
        with safe_open(str(out / shard), framework="pt") as handle:
            assert set(handle.keys()) == names
            size += sum(handle.get_tensor(n).numel() * handle.get_tensor(n).element_size() for n in names)
    assert index["metadata"]["total_size"] == size
    # The report: the same kept structures and parameter counts as in memory, also on disk.
    a, b = memory_pruner.report, stream_pruner.report
    assert [(x.attention.kept_indices, x.mlp.kept_indices) for x in a.blocks] == [
        (x.attention.kept_indices, x.mlp.kept_indices) for x in b.blocks]
    assert (a.parameters_before, a.parameters_after) == (b.parameters_before, b.parameters_after)
    assert a.parameters_after < a.parameters_before
    on_disk = json.loads((out / REPORT_NAME).read_text())
    assert on_disk["parameters_after"] == b.parameters_after and len(on_disk["blocks"]) == len(b.blocks)
    assert not [p.name for p in out.parent.iterdir() if "osscar-tmp" in p.name]


def test_one_block_at_a_time(tmp_path, tokenizer, calibration_texts, monkeypatch):
    """While block i is pruned, it is the only block with real weights, and nothing outside the blocks is."""
    from osscar_hf import capture as capture_module

    source = _checkpoint(tmp_path / "dense", "llama-gqa", {"num_hidden_layers": 3}, {"max_shard_size": "20KB"},
                         tokenizer)
    spec = get_spec(make_model("llama-gqa").config)
    models: list[torch.nn.Module] = []
    real_capture, real_prune = capture_module.capture_block_inputs, BlockStream.prune

    def capture(model, *args, **kwargs):
        models.append(model)
        return real_capture(model, *args, **kwargs)

    materialised: list[list[int]] = []
    outside: list[bool] = []

    def prune(self, index, block):
        model = models[0]
        blocks = model.get_submodule(spec.blocks)
        materialised.append([i for i, b in enumerate(blocks) if any(p.device.type != "meta" for p in b.parameters())])
        outside.append(any(p.device.type != "meta" for n, p in model.named_parameters()
                           if not n.startswith(spec.blocks + ".")))
        return real_prune(self, index, block)

    monkeypatch.setattr(capture_module, "capture_block_inputs", capture)
    monkeypatch.setattr(BlockStream, "prune", prune)
    OsscarPruner(_config(calibration_texts, (0.5, 0.5))).prune_checkpoint(source, tmp_path / "out", progress=False)
    assert materialised == [[0], [1], [2]]
    assert outside == [False, False, False]
    assert all(p.device.type == "meta" for p in models[0].parameters())


# --------------------------------------------------------------------------- errors and refusals
@pytest.fixture
def sharded(tmp_path, tokenizer) -> Path:
    return _checkpoint(tmp_path / "dense", "opt", {}, {"max_shard_size": "20KB"}, tokenizer)


def _prune(calibration_texts, source, out, **kwargs) -> Path:
    return OsscarPruner(_config(calibration_texts, (0.5, 0.5))).prune_checkpoint(source, out, progress=False, **kwargs)


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def test_missing_shard_names_the_file(sharded, tmp_path, calibration_texts):
    victim = _shards(sharded)[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name) as info:
        _prune(calibration_texts, sharded, tmp_path / "out")
    assert isinstance(info.value, OsscarError) and "does not exist" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["dense"]  # nothing written, no temporary folder left


def test_truncated_shard_names_the_file(sharded, tmp_path, calibration_texts):
    victim = _shards(sharded)[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{victim.name}.*(truncated|corrupt)"):
        _prune(calibration_texts, sharded, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["dense"]


def test_truncated_single_file_names_the_file(tmp_path, tokenizer, calibration_texts):
    source = _checkpoint(tmp_path / "dense", "opt", {}, {}, tokenizer)
    victim = source / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        _prune(calibration_texts, source, tmp_path / "out")


def test_a_shard_that_does_not_fit_the_config(sharded, tmp_path, calibration_texts):
    config = json.loads((sharded / "config.json").read_text())
    config["ffn_dim"] = 40
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"fc1\.(weight|bias). in .*model-\d+-of-\d+\.safetensors has shape \[48"):
        _prune(calibration_texts, sharded, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["dense"]


def test_missing_weights_and_no_safetensors(sharded, tmp_path, calibration_texts):
    index = json.loads((sharded / INDEX_NAME).read_text())
    del index["weight_map"]["model.decoder.layers.1.fc1.weight"]
    (sharded / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"layers\.1\.fc1\.weight"):
        _prune(calibration_texts, sharded, tmp_path / "out")
    for shard in _shards(sharded):
        shard.unlink()
    (sharded / INDEX_NAME).unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        _prune(calibration_texts, sharded, tmp_path / "out")


def test_refusals(sharded, tmp_path, calibration_texts):
    with pytest.raises(SaveError, match="dense checkpoint's own folder"):
        _prune(calibration_texts, sharded, sharded, overwrite=True)
    with pytest.raises(SaveError, match="inside it"):
        _prune(calibration_texts, sharded, tmp_path, overwrite=True)
    with pytest.raises(CheckpointError, match="neither a local checkpoint folder nor a Hub model id"):
        _prune(calibration_texts, tmp_path / "no-such-folder", tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SaveError, match="not empty"):
        _prune(calibration_texts, sharded, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    # An already pruned (osscar-format) checkpoint is refused before anything is written.
    pruned = _prune(calibration_texts, sharded, tmp_path / "out", overwrite=True)
    assert not (pruned / "keep.txt").exists() and (pruned / "config.json").is_file()
    with pytest.raises(UnsupportedModelError, match="already pruned"):
        _prune(calibration_texts, pruned, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_nothing_to_prune_copies_the_tensors(sharded, tmp_path, calibration_texts):
    out = OsscarPruner(OsscarConfig(dataset=calibration_texts, **SMALL)).prune_checkpoint(
        sharded, tmp_path / "out", progress=False)
    dense = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    copy = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert set(dense) == set(copy) and all(torch.equal(dense[k], copy[k]) for k in dense)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


# --------------------------------------------------------------------------- resuming an interrupted run
def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / INDEX_NAME).read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    assert set(out) == set(index["weight_map"])
    return out


def _interrupt_at(monkeypatch, block: int, calls: list[int]) -> None:
    """Make the run stop (as on Ctrl-C) when block ``block`` is about to be solved; record solved blocks."""
    interrupt_at(monkeypatch, BlockStream, "prune", block, calls)


@pytest.mark.parametrize("loop", [{}, {"dense_targets": True}, {"propagate": False}],
                         ids=["propagate", "dense-targets", "no-propagate"])
def test_an_interrupted_run_resumes_with_identical_output(tmp_path, tokenizer, calibration_texts, monkeypatch, loop):
    source = _checkpoint(tmp_path / "dense", "llama-gqa", {"num_hidden_layers": 3}, {"max_shard_size": "20KB"},
                         tokenizer)
    config = OsscarConfig(attention_sparsity=0.5, mlp_sparsity=0.5, dataset=calibration_texts, **SMALL, **loop)
    reference = OsscarPruner(config).prune_checkpoint(source, tmp_path / "reference", progress=False)
    model = AutoModelForCausalLM.from_pretrained(source)
    OsscarPruner(config).prune(model, tokenizer, progress=False)
    expected = model.state_dict()
    got = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)

    target = tmp_path / "out"
    calls: list[int] = []
    _interrupt_at(monkeypatch, 2, calls)
    with pytest.raises(KeyboardInterrupt):
        OsscarPruner(config).prune_checkpoint(source, target, progress=False)
    partial = partial_folder(target.absolute())
    assert not target.exists() and (partial / PROGRESS_NAME).is_file()
    assert len(json.loads((partial / PROGRESS_NAME).read_text())["blocks"]) == 2
    assert not lock_file(target.absolute()).exists()  # released and removed on the way out

    calls.clear()
    _interrupt_at(monkeypatch, -1, calls)
    pruner = OsscarPruner(config)
    assert pruner.prune_checkpoint(source, target, progress=False) == target.absolute()
    assert calls == [2]  # blocks 0 and 1 were not solved again
    assert not partial.exists() and not (target / PROGRESS_NAME).exists()
    a, b = _tensors(reference), _tensors(target)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (target / "config.json").read_text() == (reference / "config.json").read_text()
    assert (target / INDEX_NAME).read_text() == (reference / INDEX_NAME).read_text()
    assert [blk.mlp.kept_indices for blk in pruner.report.blocks] == [
        blk["mlp"]["kept_indices"] for blk in json.loads((reference / REPORT_NAME).read_text())["blocks"]]


def test_resume_refuses_other_settings_and_redoes_a_damaged_block(tmp_path, tokenizer, calibration_texts, monkeypatch):
    source = _checkpoint(tmp_path / "dense", "opt", {"num_hidden_layers": 3}, {"max_shard_size": "20KB"}, tokenizer)
    config = _config(calibration_texts, (0.5, 0.5))
    target = tmp_path / "out"
    partial = partial_folder(target.absolute())
    calls: list[int] = []
    _interrupt_at(monkeypatch, 2, calls)
    with pytest.raises(KeyboardInterrupt):
        OsscarPruner(config).prune_checkpoint(source, target, progress=False)
    before = sorted(p.name for p in partial.iterdir())
    # Other settings, or a source file that changed: refused, the partial run is left as it was.
    with pytest.raises(ResumeError, match=r"mlp_sparsity: 0\.5 -> 0\.25.*resume=False"):
        OsscarPruner(_config(calibration_texts, (0.5, 0.25))).prune_checkpoint(source, target, progress=False)
    os.utime(source / "config.json", ns=(1, 1))
    with pytest.raises(ResumeError, match="config.json"):
        OsscarPruner(config).prune_checkpoint(source, target, progress=False)
    assert sorted(p.name for p in partial.iterdir()) == before and not target.exists()
    # resume=False starts over (every block solved again).
    calls.clear()
    _interrupt_at(monkeypatch, 2, calls)
    with pytest.raises(KeyboardInterrupt):
        OsscarPruner(config).prune_checkpoint(source, target, progress=False, resume=False)
    assert calls == [0, 1]
    # A finished block whose shard was damaged afterwards is pruned again; the result is unchanged.
    progress = json.loads((partial / PROGRESS_NAME).read_text())
    damaged = partial / progress["blocks"][1]["shard"]
    damaged.write_bytes(damaged.read_bytes()[:50])
    calls.clear()
    _interrupt_at(monkeypatch, -1, calls)
    out = OsscarPruner(config).prune_checkpoint(source, target, progress=False)
    assert calls == [1, 2]
    reference = OsscarPruner(config).prune_checkpoint(source, tmp_path / "reference", progress=False)
    a, b = _tensors(reference), _tensors(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failure_before_any_block_leaves_nothing(sharded, tmp_path, calibration_texts, monkeypatch):
    calls: list[int] = []
    _interrupt_at(monkeypatch, 0, calls)
    with pytest.raises(KeyboardInterrupt):
        _prune(calibration_texts, sharded, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["dense"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_read_tensors_do_not_keep_the_shard_mapped(sharded):
    """A tensor read from a shard has its own memory: a stray reference to any of them (even a small bias) must not
    keep the pages of the whole shard file resident."""
    reader = ShardReader(LocalFiles(sharded))
    names = sorted(reader.weight_map)[:6]
    tensors = reader.read(names)
    mapped = Path("/proc/self/maps").read_text()
    for shard in reader.shards(names):
        assert str((sharded / shard).resolve()) not in mapped
    with safe_open(str(sharded / reader.weight_map[names[0]]), framework="pt") as handle:
        assert torch.equal(tensors[names[0]], handle.get_tensor(names[0]))


def test_large_allocations_are_mapped_for_the_run_unless_declined(sharded, tmp_path, calibration_texts, monkeypatch,
                                                                    caplog):
    import contextlib

    from osscar_hf.streaming import run

    entered: list[bool] = []

    @contextlib.contextmanager
    def recording():
        entered.append(True)
        yield True

    monkeypatch.setattr(run, "mapped_large_allocations", recording)
    monkeypatch.setattr(run, "heap_fragmentation_hint", lambda: "HINT: map large allocations")
    _prune(calibration_texts, sharded, tmp_path / "a")
    assert entered == [True]
    with caplog.at_level("INFO", logger="osscar_hf.streaming.run"):
        _prune(calibration_texts, sharded, tmp_path / "b", map_large_allocations=False)
    assert entered == [True]  # not entered again
    assert "HINT: map large allocations" in caplog.text
    a, b = _shards(tmp_path / "a"), _shards(tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b]
    for x, y in zip(a, b):
        with safe_open(str(x), framework="pt") as fx, safe_open(str(y), framework="pt") as fy:
            assert all(torch.equal(fx.get_tensor(k), fy.get_tensor(k)) for k in fx.keys())


def test_settings_that_do_not_change_the_result_do_not_block_a_resume(sharded, calibration_texts, monkeypatch):
    """``run_fingerprint`` leaves out the config fields named in ``OsscarConfig.RESULT_NEUTRAL_FIELDS``."""
    monkeypatch.setattr(OsscarConfig, "RESULT_NEUTRAL_FIELDS", ("batch_size",), raising=False)
    files, windows = LocalFiles(sharded), torch.zeros(2, 8, dtype=torch.long)
    reader = ShardReader(files)

    def fingerprint(**changes) -> dict:
        pruner = OsscarPruner(OsscarConfig(**{**SMALL, "dataset": calibration_texts, **changes}))
        return run_fingerprint(files, reader, pruner.config, windows, torch.device("cpu"))

    assert "batch_size" not in fingerprint()["config"]
    assert fingerprint(batch_size=1) == fingerprint(batch_size=4)
    assert fingerprint(mlp_sparsity=0.5) != fingerprint(mlp_sparsity=0.25)


# --------------------------------------------------------------------------- one run per output folder
# Runs in a second interpreter: streams SOURCE into TARGET with the tests' settings, says when block 1 is about to be
# solved, and waits there (until it is killed).
SECOND_RUN = r"""
import sys
from osscar_hf import OsscarConfig, OsscarPruner
from osscar_hf.pipeline import BlockStream
from tests.conftest import make_text

source, target = sys.argv[1], sys.argv[2]
real = BlockStream.prune

def prune(self, index, block):
    if index == 1:
        print("solving block 1", flush=True)
        sys.stdin.readline()
    return real(self, index, block)

BlockStream.prune = prune
words = make_text().split()
texts = [" ".join(words[i : i + 200]) for i in range(0, len(words), 200)]
config = OsscarConfig(attention_sparsity=0.5, mlp_sparsity=0.5, dataset=texts, num_samples=8, seq_len=32, batch_size=4,
                      device="cpu")
OsscarPruner(config).prune_checkpoint(source, target, progress=False)
"""


def test_a_second_run_into_the_same_folder_is_refused_and_a_killed_run_does_not_block(
        tmp_path, tokenizer, calibration_texts, monkeypatch):
    source = _checkpoint(tmp_path / "dense", "llama-gqa", {"num_hidden_layers": 3}, {"max_shard_size": "20KB"},
                         tokenizer)
    target = (tmp_path / "out").absolute()
    partial, lock = partial_folder(target), lock_file(target)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    other = subprocess.Popen([sys.executable, "-c", SECOND_RUN, str(source), str(target)], cwd=ROOT, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or lines[-1] not in ("solving block 1\n", ""):
            lines.append(other.stdout.readline())
        assert lines[-1], other.stderr.read()[-3000:]  # the other run got to block 1
        before = {p.name: p.read_bytes() for p in partial.iterdir()}
        assert json.loads(lock.read_text())["pid"] == other.pid
        calibrated: list[int] = []
        real_windows = OsscarPruner.calibration_windows
        monkeypatch.setattr(OsscarPruner, "calibration_windows",
                            lambda self, *a: calibrated.append(1) or real_windows(self, *a))
        with pytest.raises(ConcurrentRunError, match=rf"another prune_checkpoint run is writing to {target} \(pid "
                                                     rf"{other.pid} on {socket.gethostname()}, started .*pruning "
                                                     rf"{source}\).*{lock.name}.*wait for that run to finish"):
            _prune(calibration_texts, source, target)
        assert calibrated == []  # refused at once, before any work
        assert {p.name: p.read_bytes() for p in partial.iterdir()} == before  # the other run's folder untouched
        assert other.poll() is None
    finally:
        other.send_signal(signal.SIGKILL)  # as a crash: no clean-up runs
        other.wait(timeout=30)
        other.stdout.close()
        other.stderr.close()
    assert lock.exists()  # left behind by the killed run, and harmless: its lock died with it
    calls: list[int] = []
    _interrupt_at(monkeypatch, -1, calls)
    assert _prune(calibration_texts, source, target) == target
    assert calls == [1, 2]  # the killed run's block 0 is kept
    assert not lock.exists() and not partial.exists()
    reference = _prune(calibration_texts, source, tmp_path / "reference")
    a, b = _tensors(reference), _tensors(target)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
