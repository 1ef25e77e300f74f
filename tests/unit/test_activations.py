"""Tests of osscar_hf.activations: stores in memory and on disk, the space that owns their folder, and the
memory/disk decision."""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import pytest
import torch

from osscar_hf import activations as act
from osscar_hf.activations import (
    DISK_THRESHOLD_FRACTION,
    ActivationSpace,
    ActivationStorageError,
    ActivationStore,
    available_memory_bytes,
    choose_storage,
    stream_count,
)
from osscar_hf.errors import OsscarError


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bf16 = torch.randn(2, 5, 7, generator=g).to(torch.bfloat16)
    bf16.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40], dtype=torch.bfloat16)
    return [
        bf16,
        torch.randn(3, 4, generator=g).half(),
        torch.randn(3, 4, generator=g),
        torch.randn(2, 2, 2, generator=g, dtype=torch.float64),
        torch.randint(-(2**40), 2**40, (6,), generator=g),
        torch.rand(4, 3, generator=g) > 0.5,
        torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
        torch.randn(3, generator=g, dtype=torch.complex64),
        torch.tensor(3.5, dtype=torch.bfloat16),          # 0-dim
        torch.empty(0, 4, dtype=torch.float16),           # empty
        torch.randn(4, 6, generator=g).to(torch.bfloat16).T,  # not contiguous
    ]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes (so NaN and -0.0 compare exactly)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _space(tmp_path: Path, storage: str = "disk") -> ActivationSpace:
    space = ActivationSpace(storage, tmp_path)
    space.resolve(0)
    return space


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_round_trip_keeps_dtype_shape_device_and_bits(storage, tmp_path):
    with _space(tmp_path, storage) as space:
        store = space.store()
        originals = _tensors()
        for t in originals:
            store.append(t)
        assert len(store) == len(originals)
        for got, want in [*zip(store, originals), *((store[i], t) for i, t in enumerate(originals))]:
            assert got.dtype == want.dtype and got.shape == want.shape and got.device == want.device
            assert torch.equal(_bits(got), _bits(want))
        assert store[-1].shape == originals[-1].shape
        assert store.nbytes == sum(t.numel() * t.element_size() for t in originals)


def test_memory_store_holds_the_tensors_themselves(tmp_path):
    store = _space(tmp_path, "memory").store()
    t = torch.ones(3)
    store.append(t)
    assert store[0] is t and next(iter(store)) is t
    assert not list(tmp_path.iterdir())  # nothing written


def test_disk_store_writes_one_file_per_tensor_and_reads_fresh_tensors(tmp_path):
    with _space(tmp_path) as space:
        store = space.store()
        t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        store.append(t)
        store.append(t * 2)
        files = sorted(space.folder.iterdir())
        assert len(files) == 2 and files[0].stat().st_size == 48
        assert space.folder.parent == tmp_path and space.folder.name.startswith("osscar-activations-")
        a = store[0]
        assert a is not t and torch.equal(a, t)
        a.zero_()  # a read-back copy: the stored tensor is unchanged
        assert torch.equal(store[0], t)
        t.fill_(7)  # and so is the appended one, once written
        assert torch.equal(store[1], torch.arange(12, dtype=torch.float32).reshape(3, 4) * 2)


def test_iteration_can_stop_early_and_resume(tmp_path):
    with _space(tmp_path) as space:
        store = space.store()
        store.extend(torch.full((2,), float(i)) for i in range(5))
        for i, t in enumerate(store):
            if i == 2:
                break
        assert [float(t[0]) for t in store] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_close_deletes_files_and_refuses_reads(tmp_path):
    with _space(tmp_path) as space:
        store = space.store()
        store.append(torch.ones(4))
        store.close()
        store.close()  # idempotent
        assert not list(space.folder.iterdir())
        assert space.bytes_on_disk == 0 and space.peak_bytes_on_disk == 16
        with pytest.raises(ActivationStorageError, match="closed"):
            store[0]
        with pytest.raises(ActivationStorageError, match="closed"):
            store.append(torch.ones(1))


def test_copy_shares_files_until_both_are_closed(tmp_path):
    with _space(tmp_path) as space:
        a = space.store()
        a.append(torch.ones(8))
        b = a.copy()
        assert len(list(space.folder.iterdir())) == 1 and space.bytes_on_disk == 32
        a.close()
        assert torch.equal(b[0], torch.ones(8))
        b.close()
        assert not list(space.folder.iterdir()) and space.bytes_on_disk == 0


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_subset_shares_the_chosen_tensors(tmp_path, storage):
    with ActivationSpace(storage, tmp_path) as space:
        space.resolve(16)
        a = space.store()
        a.extend(torch.full((2,), float(i)) for i in range(4))
        some, prefix, none = a.subset([3, 1]), a.copy(1), a.subset([])
        a.close()  # the copies keep their tensors
        assert [float(t[0]) for t in some] == [3.0, 1.0] and [float(t[0]) for t in prefix] == [0.0]
        assert len(none) == 0
        for store in (some, prefix, none):
            store.close()
        if storage == "disk":
            assert space.bytes_on_disk == 0


def test_space_removes_its_folder_also_on_errors(tmp_path):
    parent = tmp_path / "new" / "parent"  # created when needed
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationSpace("disk", parent) as space:
            space.resolve(16)
            space.store().append(torch.ones(4))
            folder = space.folder
            assert folder.is_dir()
            raise RuntimeError("boom")
    assert not folder.exists() and parent.is_dir() and not list(parent.iterdir())
    with pytest.raises(ActivationStorageError, match="closed"):
        space.store()


def test_store_context_manager_deletes_files_on_errors(tmp_path):
    with _space(tmp_path) as space:
        with pytest.raises(ValueError):
            with space.store() as store:
                store.append(torch.ones(2))
                raise ValueError
        assert not list(space.folder.iterdir())


def test_garbage_collected_space_removes_its_folder(tmp_path):
    space = _space(tmp_path)
    store = space.store()
    store.append(torch.ones(3))
    folder = space.folder
    del space, store
    gc.collect()
    assert not folder.exists()


def test_default_folder_is_under_the_temp_dir(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with ActivationSpace("disk") as space:
        space.resolve(4)
        space.store().append(torch.ones(1))
        assert space.folder.parent == tmp_path
    assert not list(tmp_path.iterdir())


def test_truncated_file_is_a_clear_error(tmp_path):
    with _space(tmp_path) as space:
        store = space.store()
        store.append(torch.ones(10))
        path = next(space.folder.iterdir())
        path.write_bytes(path.read_bytes()[:8])
        with pytest.raises(ActivationStorageError) as info:
            store[0]
        assert str(path) in str(info.value) and "truncated (8 of 40 bytes)" in str(info.value)
        path.unlink()
        with pytest.raises(ActivationStorageError, match=path.name):
            store[0]


def test_unusable_directory_is_a_clear_error(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    space = ActivationSpace("disk", not_a_folder)
    with pytest.raises(ActivationStorageError, match=r"cannot create a folder.*file.*activation_dir") as info:
        space.resolve(4)
    assert isinstance(info.value, OsscarError) and isinstance(info.value, OSError)


def test_write_failure_is_a_clear_error(tmp_path, monkeypatch):
    def full(path, tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(act, "_write_file", full)
    with _space(tmp_path) as space:
        with pytest.raises(ActivationStorageError, match="No space left.*activation_dir"):
            space.store().append(torch.ones(4))
        assert not list(space.folder.iterdir())


def test_bad_values_name_the_value():
    with pytest.raises(ActivationStorageError, match=r"activation_storage must be one of \['auto', 'memory', 'disk'\], "
                                                     r"got 'ram'"):
        ActivationSpace("ram")
    with pytest.raises(ActivationStorageError, match="got 'swap'"):
        choose_storage("swap", stream_bytes=1, streams=2)
    with pytest.raises(RuntimeError, match="resolve"):
        ActivationSpace("auto").store()
    with pytest.raises(TypeError, match="holds tensors"):
        ActivationSpace("memory").store().append([1, 2])


# --------------------------------------------------------------------------- the memory/disk decision
def test_stream_count():
    assert stream_count(dense_targets=False) == 2 and stream_count(dense_targets=True) == 4


def test_auto_uses_disk_above_the_threshold(caplog):
    gib = 2**30
    limit_streams = DISK_THRESHOLD_FRACTION * 16 * gib  # 16 GiB available
    with caplog.at_level(logging.INFO, logger="osscar_hf.activations"):
        assert choose_storage("auto", stream_bytes=int(limit_streams / 2) + 1, streams=2, available=16 * gib) == "disk"
    assert "on disk" in caplog.text and "16.00 GiB available" in caplog.text
    assert choose_storage("auto", stream_bytes=int(limit_streams / 2), streams=2, available=16 * gib) == "memory"
    assert choose_storage("auto", stream_bytes=gib, streams=4, available=7 * gib) == "disk"
    assert choose_storage("memory", stream_bytes=10**15, streams=4, available=1) == "memory"
    assert choose_storage("disk", stream_bytes=1, streams=2, available=10**15) == "disk"


def test_auto_stays_in_memory_when_available_memory_is_unknown(monkeypatch):
    monkeypatch.setattr(act, "available_memory_bytes", lambda: None)
    assert choose_storage("auto", stream_bytes=10**15, streams=4) == "memory"


def test_space_resolves_auto_once(monkeypatch, tmp_path):
    monkeypatch.setattr(act, "available_memory_bytes", lambda: 1000)
    with ActivationSpace("auto", tmp_path, streams=2) as space:
        assert space.resolve(501) == "disk" and space.on_disk
        assert space.resolve(1) == "disk"  # settled
        assert space.summary() == {"storage": "disk", "requested": "auto", "stream_bytes": 501,
                                   "peak_disk_bytes": 0, "files_written": 0}
    with ActivationSpace("auto", tmp_path, streams=2) as space:
        assert space.resolve(250) == "memory" and space.folder is None


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux only")
def test_available_memory_is_known_on_linux(monkeypatch):
    import builtins

    real_import = builtins.__import__
    assert 0 < available_memory_bytes()

    def no_psutil(name, *args, **kwargs):
        if name == "psutil":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    assert 0 < available_memory_bytes()  # from /proc/meminfo


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_come_back_on_cuda(tmp_path):
    with _space(tmp_path) as space:
        store = space.store()
        t = torch.randn(3, 4, device="cuda").to(torch.bfloat16)
        store.append(t)
        assert store[0].device == t.device and torch.equal(store[0], t)


def test_store_repr(tmp_path):
    with _space(tmp_path) as space:
        store = space.store()
        store.append(torch.ones(1))
        assert repr(store) == "ActivationStore(1 tensors on disk)"
        assert isinstance(store, ActivationStore) and "disk at" in repr(space)
