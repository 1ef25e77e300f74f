"""Streaming pruning of a Hub model by id (``prune_checkpoint("namespace/name", ...)``), against the loopback fake
Hub of tests/fake_hub.py.

The checkpoint on the fake Hub is the local test checkpoint uploaded as is (seven shards for three blocks), so
the Hub run must write exactly what streaming the local folder writes. What a run downloads is read from the
server's log of whole-file GETs (``FakeHub.downloads``): shard headers come by ranged GETs, which are not
downloads. Every run uses its own huggingface_hub cache (``cache_dir``) and ``endpoint=``, so nothing depends on
the environment.
"""

from __future__ import annotations

import json
import os
import socket
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, hf_hub_download
from safetensors import safe_open

from osscar_hf import OsscarConfig, OsscarPruner
from osscar_hf.pipeline import BlockStream
from osscar_hf.streaming import (
    INDEX_NAME,
    PROGRESS_NAME,
    CheckpointError,
    ResumeError,
    lock_file,
    partial_folder,
)
from tests.conftest import make_model
from tests.fake_hub import FakeHub

REPO = "org/tiny-llama"
SMALL = dict(num_samples=8, seq_len=32, batch_size=4, device="cpu")
NUM_BLOCKS = 3


def _config(texts: list[str]) -> OsscarConfig:
    return OsscarConfig(attention_sparsity=0.5, mlp_sparsity=0.5, dataset=texts, **SMALL)


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer) -> Path:
    """The local dense checkpoint: Llama with GQA, 3 blocks, 7 shards (some shared by two blocks, or by a block and
    the embeddings/head)."""
    folder = tmp_path_factory.mktemp("hub-source") / "dense"
    make_model("llama-gqa", num_hidden_layers=NUM_BLOCKS).save_pretrained(folder, max_shard_size="20KB")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory, calibration_texts) -> Path:
    """What streaming the local folder writes."""
    out = tmp_path_factory.mktemp("hub-reference") / "local"
    return OsscarPruner(_config(calibration_texts)).prune_checkpoint(source, out, progress=False)


@pytest.fixture
def hub(source):
    """A fake Hub holding ``REPO`` (the local checkpoint, file for file)."""
    with FakeHub() as server:
        server.add_repo(REPO, {p.name: p.read_bytes() for p in source.iterdir()})
        yield server
    assert server.unhandled == []


def _needs(source: Path) -> dict[str, set[str]]:
    """The shards each phase reads: "other" (embeddings, final norm, head) and "0", "1", ... (the blocks)."""
    weight_map = json.loads((source / INDEX_NAME).read_text())["weight_map"]
    out: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        out.setdefault(key.split(".")[2] if ".layers." in key else "other", set()).add(shard)
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / INDEX_NAME).read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def _assert_same_checkpoint(got: Path, expected: Path) -> None:
    a, b = _tensors(expected), _tensors(got)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    for name in names:
        if name not in ("README.md", "osscar_report.json"):  # the report has timings, the card the base model
            assert (got / name).read_bytes() == (expected / name).read_bytes(), name


def _weights(downloads: list[tuple[str, str]]) -> list[str]:
    return [path for repo, path in downloads if repo == REPO and path.endswith(".safetensors")]


_REAL_PRUNE = BlockStream.prune


def _hook(monkeypatch, action) -> None:
    """Call ``action(index)`` when block ``index`` (already read from its shards) is about to be solved."""
    def prune(self, index, module):
        action(index)
        return _REAL_PRUNE(self, index, module)

    monkeypatch.setattr(BlockStream, "prune", prune)


class Stop(KeyboardInterrupt):
    """Ends a run as Ctrl-C does."""


# --------------------------------------------------------------------------- the result
def test_a_hub_id_streams_to_the_local_result(hub, source, reference, tmp_path, calibration_texts):
    pruner = OsscarPruner(_config(calibration_texts))
    out = pruner.prune_checkpoint(REPO, tmp_path / "out", endpoint=hub.url, cache_dir=tmp_path / "cache",
                                  token=False, progress=False)
    assert out == (tmp_path / "out").absolute()
    _assert_same_checkpoint(out, reference)
    # The model card names the Hub model as the base model (a local folder has none).
    assert ModelCard.load(out / "README.md").data.base_model == REPO
    assert ModelCard.load(reference / "README.md").data.base_model is None
    # Every file was downloaded once; the weights are all the shards, each once.
    shards = set().union(*_needs(source).values())
    assert Counter(_weights(hub.downloads)) == Counter(shards)
    assert Counter(path for _, path in hub.downloads).most_common(1)[0][1] == 1
    assert not lock_file(out).exists() and not partial_folder(out).exists()

    # A second run with the same cache downloads nothing (its header look-ups come from the cache as well).
    before = len(hub.requests)
    OsscarPruner(_config(calibration_texts)).prune_checkpoint(REPO, tmp_path / "again", endpoint=hub.url,
                                                              cache_dir=tmp_path / "cache", token=False,
                                                              progress=False)
    new = hub.requests[before:]
    assert [m for m, p in new if "/resolve/" in p] == [] and len(new) == 1  # only the repo look-up
    _assert_same_checkpoint(tmp_path / "again", reference)


def test_shards_are_fetched_lazily_and_a_resumed_run_does_not_download_them_again(
        hub, source, reference, tmp_path, calibration_texts, monkeypatch):
    needs = _needs(source)
    target, cache = tmp_path / "out", tmp_path / "cache"
    seen: dict[int, set[str]] = {}

    def record_then_stop_at_block_1(index: int) -> None:
        seen[index] = set(_weights(hub.downloads))
        if index == 1:
            raise Stop

    _hook(monkeypatch, record_then_stop_at_block_1)
    with pytest.raises(Stop):
        OsscarPruner(_config(calibration_texts)).prune_checkpoint(REPO, target, endpoint=hub.url, cache_dir=cache,
                                                                  token=False, progress=False)
    # When block i is solved, exactly the shards of the embeddings/head and of blocks 0..i have been downloaded.
    assert seen[0] == needs["other"] | needs["0"]
    assert seen[1] == needs["other"] | needs["0"] | needs["1"]
    assert needs["2"] - seen[1], "the checkpoint layout must leave a shard that only block 2 needs"
    assert len(json.loads((partial_folder(target.absolute()) / PROGRESS_NAME).read_text())["blocks"]) == 1

    solved: list[int] = []
    _hook(monkeypatch, solved.append)
    out = OsscarPruner(_config(calibration_texts)).prune_checkpoint(REPO, target, endpoint=hub.url, cache_dir=cache,
                                                                    token=False, progress=False)
    assert solved == [1, 2]  # block 0 was not solved again
    _assert_same_checkpoint(out, reference)
    # Across both runs every shard was downloaded exactly once: the resumed run took the others from the cache.
    assert Counter(_weights(hub.downloads)) == Counter(set().union(*needs.values()))


def test_delete_downloaded_shards_frees_the_cache_but_keeps_what_was_there(
        hub, source, reference, tmp_path, calibration_texts, monkeypatch):
    needs = _needs(source)
    cache = tmp_path / "cache"
    sha = hub.repos[REPO].branches["main"]
    # The user had one shard (of the embeddings and block 0) in the cache already.
    theirs = min(needs["0"] & needs["other"])
    their_path = Path(hf_hub_download(REPO, theirs, revision=sha, cache_dir=cache, endpoint=hub.url, token=False))
    their_blob = Path(os.path.realpath(their_path))
    snapshot = their_path.parent

    def cached() -> set[str]:
        return {p.name for p in snapshot.iterdir() if p.name.endswith(".safetensors")}

    state: dict[int, set[str]] = {}

    def watch(index: int) -> None:
        state[index] = cached()
        if index == 2:
            raise Stop

    _hook(monkeypatch, watch)
    target = tmp_path / "out"
    run = dict(endpoint=hub.url, cache_dir=cache, token=False, progress=False, delete_downloaded_shards=True)
    with pytest.raises(Stop):
        OsscarPruner(_config(calibration_texts)).prune_checkpoint(REPO, target, **run)
    # While block 2 is solved, the shards no phase after block 1 reads are gone, except the user's.
    later = needs["2"]
    assert state[2] == later | {theirs}
    # Rerun after the interruption: it finishes, and deletes what the interrupted run downloaded too.
    _hook(monkeypatch, lambda index: None)
    out = OsscarPruner(_config(calibration_texts)).prune_checkpoint(REPO, target, **run)
    _assert_same_checkpoint(out, reference)
    assert cached() == {theirs}
    assert their_path.read_bytes() == (source / theirs).read_bytes() and their_blob.is_file()
    blobs = {p.name for p in their_blob.parent.iterdir()}
    kept = {Path(os.path.realpath(snapshot / n)).name for n in os.listdir(snapshot)}
    assert blobs == kept  # no orphaned blob of a deleted shard
    for name in ("config.json", INDEX_NAME, "tokenizer.json"):
        assert (snapshot / name).is_file()  # small files stay cached


def test_the_hub_going_down_mid_run_then_a_moved_revision(hub, source, reference, tmp_path, calibration_texts,
                                                           monkeypatch):
    from huggingface_hub.utils import _http

    # huggingface_hub retries a refused connection 5 times with backoff (23 s of sleeping): skip the sleeps.
    waits: list[float] = []
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=waits.append))
    target, cache = tmp_path / "out", tmp_path / "cache"
    _hook(monkeypatch, lambda index: hub.stop() if index == 1 else None)
    url = hub.url
    with pytest.raises(CheckpointError, match=rf"cannot reach the Hugging Face Hub at {url} to download "
                                              rf"model-\d+-of-\d+\.safetensors of {REPO}.*check the network"):
        OsscarPruner(_config(calibration_texts)).prune_checkpoint(REPO, target, endpoint=url, cache_dir=cache,
                                                                  token=False, progress=False)
    assert waits  # it did retry before giving up
    partial = partial_folder(target.absolute())
    assert len(json.loads((partial / PROGRESS_NAME).read_text())["blocks"]) == 2
    assert not lock_file(target.absolute()).exists()

    hub.start()  # back, on another port; meanwhile main moved to a new commit
    old = hub.repos[REPO].branches["main"]
    files = hub.files(REPO)
    new = hub.add_repo(REPO, {**files, "README.md": b"new card\n"})
    _hook(monkeypatch, lambda index: None)
    run = dict(endpoint=hub.url, cache_dir=cache, token=False, progress=False)
    with pytest.raises(ResumeError, match=rf"source\.commit: '{old}' -> '{new}'.*moved from commit {old} to {new}.*"
                                          rf"revision='{old}'"):
        OsscarPruner(_config(calibration_texts)).prune_checkpoint(REPO, target, **run)
    solved: list[int] = []
    _hook(monkeypatch, solved.append)
    out = OsscarPruner(_config(calibration_texts)).prune_checkpoint(REPO, target, revision=old, **run)
    assert solved == [2]
    _assert_same_checkpoint(out, reference)


# --------------------------------------------------------------------------- errors
def _nothing_written(tmp_path: Path) -> None:
    assert sorted(os.listdir(tmp_path)) in ([], ["cache"])


def test_an_unknown_repo_or_revision_or_a_rejected_token(hub, tmp_path, calibration_texts):
    pruner = OsscarPruner(_config(calibration_texts))
    run = dict(endpoint=hub.url, cache_dir=tmp_path / "cache", token=False, progress=False)
    with pytest.raises(CheckpointError, match=r"no model repository 'org/missing' on http://127\.0\.0\.1:\d+ "
                                              r"\(and no local folder of that name\).*token="):
        pruner.prune_checkpoint("org/missing", tmp_path / "out", **run)
    with pytest.raises(CheckpointError, match=rf"{REPO} has no revision 'nope'"):
        pruner.prune_checkpoint(REPO, tmp_path / "out", revision="nope", **run)
    with pytest.raises(CheckpointError, match=rf"rejected the token while trying to look up {REPO} \(401\).*invalid "
                                              "or expired"):
        pruner.prune_checkpoint(REPO, tmp_path / "out", **{**run, "token": "hf_not_a_token"})
    _nothing_written(tmp_path)


def test_a_gated_repo_needs_access(hub, source, tmp_path, calibration_texts):
    hub.tokens.update({"hf_bob": "bob", "hf_carol": "carol"})
    hub.add_repo("org/gated", {p.name: p.read_bytes() for p in source.iterdir()}, gated=True, approved={"carol"})
    pruner = OsscarPruner(_config(calibration_texts))
    run = dict(endpoint=hub.url, cache_dir=tmp_path / "cache", progress=False)
    for token in (False, "hf_bob"):
        with pytest.raises(CheckpointError, match=r"org/gated is a gated repository.*accept its conditions at "
                                                  r"http://127\.0\.0\.1:\d+/org/gated.*token"):
            pruner.prune_checkpoint("org/gated", tmp_path / "out", token=token, **run)
    _nothing_written(tmp_path)
    assert pruner.prune_checkpoint("org/gated", tmp_path / "out", token="hf_carol", **run).is_dir()


def test_a_repo_without_safetensors(hub, tmp_path, calibration_texts):
    model = make_model("opt")
    hub.add_repo("org/bin-only", {"config.json": model.config.to_json_string().encode(),
                                  "pytorch_model.bin": b"not really"})
    with pytest.raises(CheckpointError, match=r"org/bin-only \(commit [0-9a-f]{40}\) has neither "
                                              r"model\.safetensors\.index\.json nor model\.safetensors.*"
                                              r"pytorch_model\.bin"):
        OsscarPruner(_config(calibration_texts)).prune_checkpoint("org/bin-only", tmp_path / "out",
                                                                  endpoint=hub.url, cache_dir=tmp_path / "cache",
                                                                  token=False, progress=False)
    _nothing_written(tmp_path)


def test_an_unreachable_hub(tmp_path, calibration_texts):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(CheckpointError, match=rf"cannot reach the Hugging Face Hub at http://127\.0\.0\.1:{port} to "
                                              rf"look up {REPO}.*check the network connection.*hf download {REPO}"):
        OsscarPruner(_config(calibration_texts)).prune_checkpoint(REPO, tmp_path / "out",
                                                                  endpoint=f"http://127.0.0.1:{port}",
                                                                  cache_dir=tmp_path / "cache", token=False,
                                                                  progress=False)
    _nothing_written(tmp_path)


@pytest.mark.parametrize("name", ["./not/here", "/not/here/either", "a/b/c", "bad--id"])
def test_neither_a_folder_nor_a_hub_id(tmp_path, calibration_texts, name):
    with pytest.raises(CheckpointError, match="neither a local checkpoint folder nor a Hub model id"):
        OsscarPruner(_config(calibration_texts)).prune_checkpoint(name, tmp_path / "out", progress=False)
    _nothing_written(tmp_path)


def test_revision_is_for_hub_ids_only(source, tmp_path, calibration_texts):
    with pytest.raises(CheckpointError, match="revision='main' applies to Hub model ids.*local folder"):
        OsscarPruner(_config(calibration_texts)).prune_checkpoint(source, tmp_path / "out", revision="main",
                                                                  progress=False)
