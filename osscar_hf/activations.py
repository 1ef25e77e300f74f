"""Calibration activations of the block loop, held in host memory or in files on disk.

The loop carries one hidden-state tensor per calibration batch from each block to the next: the current
inputs while the next ones are produced, and with ``dense_targets`` the dense model's stream as well. For a
large model those streams do not fit a small host (OPT-30B, 128 windows of 2048 tokens in bfloat16: 3.8 GB
per stream, up to four at once), so they may live on disk instead:

* :class:`ActivationStore` is a list-like sequence of per-batch tensors (``append``, ``store[i]``, ``len``,
  iteration). In memory it is a plain list. On disk every tensor is one file of raw bytes; reading one gives a
  fresh, ordinary tensor (not memory-mapped, so it leaves host memory when dropped) with the dtype, shape and
  device it was appended with. :meth:`ActivationStore.close` deletes its files.
* :class:`ActivationSpace` owns the stores of one run: it decides between memory and disk
  (:meth:`ActivationSpace.resolve`; ``"auto"`` compares the loop's estimated footprint with the host's
  available memory, see :data:`DISK_THRESHOLD_FRACTION`), owns the folder of the files (a fresh folder
  inside ``directory``, or under ``tempfile.gettempdir()``) and removes it on :meth:`ActivationSpace.close`,
  at the end of a ``with`` block (also on errors), or when it is garbage-collected.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ActivationStorageError

logger = logging.getLogger(__name__)

__all__ = [
    "DISK_THRESHOLD_FRACTION",
    "STORAGE_MODES",
    "ActivationSpace",
    "ActivationStorageError",
    "ActivationStore",
    "available_memory_bytes",
    "choose_storage",
    "stream_count",
]

STORAGE_MODES = ("auto", "memory", "disk")
# "auto" keeps the activations on disk when the loop would hold more than this fraction of the memory
# available to the process (the rest is left to the block, its Gram matrices and the solver).
DISK_THRESHOLD_FRACTION = 0.5
FOLDER_PREFIX = "osscar-activations-"


# --------------------------------------------------------------------------- deciding where activations live
def _cgroup_available_bytes() -> int | None:
    """Memory left under this process's cgroup (v2) limit, or ``None`` when there is no limit."""
    try:
        base = Path("/sys/fs/cgroup")
        limit_text = (base / "memory.max").read_text().strip()
        if limit_text == "max":
            return None
        return max(0, int(limit_text) - int((base / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def available_memory_bytes() -> int | None:
    """Host memory available to this process (psutil's ``available`` or ``MemAvailable`` of /proc/meminfo,
    capped by a cgroup v2 limit), or ``None`` when unknown."""
    available: int | None = None
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported here: fall back to /proc/meminfo
        try:
            with open("/proc/meminfo", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            available = None
    cgroup = _cgroup_available_bytes()
    if cgroup is not None:
        available = cgroup if available is None else min(available, cgroup)
    return available


def stream_count(*, dense_targets: bool) -> int:
    """How many activation streams the loop holds at once: the current inputs and the next ones being produced
    (with or without propagation), and with ``dense_targets`` the dense model's current and next inputs too."""
    return 4 if dense_targets else 2


def _gib(n: float) -> str:
    """A byte count for log messages (MiB below 1 GiB)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _where(storage: str) -> str:
    return "on disk" if storage == "disk" else "in memory"


def choose_storage(mode: str, *, stream_bytes: int, streams: int, available: int | None = None) -> str:
    """``"memory"`` or ``"disk"`` for the requested ``mode`` (``"auto"``, ``"memory"``, ``"disk"``).

    ``"auto"`` gives ``"disk"`` when ``stream_bytes * streams`` exceeds :data:`DISK_THRESHOLD_FRACTION` of
    ``available`` (default: :func:`available_memory_bytes`), and ``"memory"`` otherwise or when the available
    memory is unknown. The decision is logged with its numbers.
    """
    if mode not in STORAGE_MODES:
        raise ActivationStorageError(f"activation_storage must be one of {list(STORAGE_MODES)}, got {mode!r}")
    need = stream_bytes * streams
    if mode != "auto":
        logger.info("calibration activations %s (activation_storage=%r): up to %d streams of %s = %s",
                    _where(mode), mode, streams, _gib(stream_bytes), _gib(need))
        return mode
    if available is None:
        available = available_memory_bytes()
    if available is None:
        logger.info("calibration activations in memory (activation_storage='auto', available memory unknown): "
                    "up to %d streams of %s = %s", streams, _gib(stream_bytes), _gib(need))
        return "memory"
    limit = DISK_THRESHOLD_FRACTION * available
    choice = "disk" if need > limit else "memory"
    logger.info("calibration activations %s (activation_storage='auto'): up to %d streams of %s = %s %s %.0f%% "
                "of the %s available", _where(choice), streams, _gib(stream_bytes), _gib(need),
                ">" if choice == "disk" else "<=", 100 * DISK_THRESHOLD_FRACTION, _gib(available))
    return choice


# --------------------------------------------------------------------------- files of raw tensor bytes
def _byte_view(tensor: torch.Tensor) -> Any:
    """A writable 1-D uint8 numpy view of a contiguous CPU tensor's bytes."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def _write_file(path: Path, tensor: torch.Tensor) -> None:
    data = memoryview(_byte_view(tensor))
    with open(path, "xb", buffering=0) as fh:
        done = 0
        while done < len(data):  # a single write may be partial (at most ~2 GiB per call on Linux)
            done += fh.write(data[done:])


def _read_ahead(path: Path) -> None:
    """Ask the kernel to start reading ``path`` into the page cache (asynchronously; a no-op where unsupported)."""
    if not hasattr(os, "posix_fadvise"):  # pragma: no cover - not POSIX
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _read_file(path: Path, out: torch.Tensor) -> int:
    data = memoryview(_byte_view(out))
    with open(path, "rb", buffering=0) as fh:
        done = 0
        while done < len(data):
            n = fh.readinto(data[done:])
            if not n:
                break
            done += n
    return done


@dataclass
class _Blob:
    """One tensor saved on disk, shared by the stores that hold it (see :meth:`ActivationStore.copy`)."""

    path: Path
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    nbytes: int
    refs: int = 1


class ActivationSpace:
    """Where one run's calibration activations live, and the owner of their folder on disk.

    ``storage`` is ``"auto"``, ``"memory"`` or ``"disk"``; ``"auto"`` is settled by :meth:`resolve` once the size
    of one stream is known. ``directory``: the folder in which a fresh sub-folder (``osscar-activations-*``) holds
    the files (created when needed; default ``tempfile.gettempdir()``). The sub-folder is removed by
    :meth:`close` (a ``with`` block closes it, also on errors) or, failing that, when the space is
    garbage-collected or the interpreter exits. ``streams``: how many streams the loop holds at once (see
    :func:`stream_count`), for ``"auto"``.
    """

    def __init__(self, storage: str = "memory", directory: str | os.PathLike | None = None, *,
                 streams: int = 2) -> None:
        if storage not in STORAGE_MODES:
            raise ActivationStorageError(f"activation_storage must be one of {list(STORAGE_MODES)}, got {storage!r}")
        self.requested = storage
        self.storage: str | None = None if storage == "auto" else storage
        self.directory = None if directory is None else Path(directory)
        self.streams = streams
        self.stream_bytes: int | None = None
        self.folder: Path | None = None
        self.bytes_on_disk = 0
        self.peak_bytes_on_disk = 0
        self.files_written = 0
        self._counter = 0
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None
        self._closed = False

    @classmethod
    def for_settings(cls, settings: Any) -> ActivationSpace:
        """The space a :class:`osscar_hf.pipeline.LoopSettings` asks for."""
        return cls(settings.activation_storage, settings.activation_dir,
                   streams=stream_count(dense_targets=settings.dense_targets))

    # ----------------------------------------------------------------- decision
    @property
    def on_disk(self) -> bool:
        return self.storage == "disk"

    def resolve(self, stream_bytes: int) -> str:
        """Settle ``"auto"`` for streams of ``stream_bytes`` each (logged); return ``"memory"`` or ``"disk"``.
        Later calls return the first answer."""
        if self.stream_bytes is None:
            self.stream_bytes = int(stream_bytes)
            self.storage = choose_storage(self.requested, stream_bytes=self.stream_bytes, streams=self.streams)
            if self.on_disk:
                self._check_folder()
        assert self.storage is not None
        return self.storage

    def _check_folder(self) -> None:
        """Create the folder now, so that a bad ``directory`` fails before any work, and warn when it lacks space
        or is memory-backed."""
        folder = self._folder()
        need = (self.stream_bytes or 0) * self.streams
        try:
            free = shutil.disk_usage(folder).free
        except OSError:  # pragma: no cover
            free = None
        if free is not None and free < need:
            logger.warning("the activation folder %s has %s free but the loop may write %s: set activation_dir "
                           "to a folder on a larger disk", folder, _gib(free), _gib(need))
        if _is_tmpfs(folder):
            logger.warning("the activation folder %s is on a tmpfs (memory-backed): the activations still use "
                           "memory there; set activation_dir to a folder on a real disk", folder)

    def _folder(self) -> Path:
        if self._closed:
            raise ActivationStorageError("the activation space is closed")
        if self.folder is None:
            parent = self.directory if self.directory is not None else Path(tempfile.gettempdir())
            try:
                parent.mkdir(parents=True, exist_ok=True)
                self.folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=parent))
            except OSError as exc:
                raise ActivationStorageError(
                    f"cannot create a folder for calibration activations in {str(parent)!r}: {exc}; set "
                    "activation_dir to a writable folder") from None
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.folder), ignore_errors=True)
            logger.info("calibration activations are written to %s", self.folder)
        return self.folder

    # ----------------------------------------------------------------- stores
    def store(self) -> ActivationStore:
        """A new, empty store in this space."""
        if self.storage is None:
            raise RuntimeError("ActivationSpace.resolve() must settle 'auto' before stores are made")
        if self._closed:
            raise ActivationStorageError("the activation space is closed")
        return ActivationStore(self)

    def _save(self, tensor: torch.Tensor) -> _Blob:
        folder = self._folder()
        with self._lock:
            self._counter += 1
            path = folder / f"{self._counter:08d}.bin"
        cpu = tensor.detach().to("cpu").contiguous()
        nbytes = cpu.numel() * cpu.element_size()
        try:
            _write_file(path, cpu)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise ActivationStorageError(
                f"cannot write calibration activations ({_gib(nbytes)}) to {path}: {exc}; free some space or set "
                "activation_dir to a folder on a larger disk") from None
        with self._lock:
            self.bytes_on_disk += nbytes
            self.peak_bytes_on_disk = max(self.peak_bytes_on_disk, self.bytes_on_disk)
            self.files_written += 1
        return _Blob(path, tensor.shape, tensor.dtype, tensor.device, nbytes)

    def _load(self, blob: _Blob) -> torch.Tensor:
        out = torch.empty(blob.shape, dtype=blob.dtype)
        try:
            got = _read_file(blob.path, out)
        except OSError as exc:
            raise ActivationStorageError(f"cannot read calibration activations back from {blob.path}: {exc}") from None
        if got != blob.nbytes:
            raise ActivationStorageError(
                f"calibration activations in {blob.path} are truncated ({got} of {blob.nbytes} bytes): was the "
                "folder changed while pruning?")
        return out if blob.device.type == "cpu" else out.to(blob.device)

    def _release(self, blob: _Blob) -> None:
        with self._lock:
            blob.refs -= 1
            if blob.refs > 0:
                return
            self.bytes_on_disk -= blob.nbytes
        try:
            blob.path.unlink()
        except FileNotFoundError:
            pass

    # ----------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Delete every file and the sub-folder (idempotent); stores of this space can no longer be read."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()  # shutil.rmtree of the folder, once

    def __enter__(self) -> ActivationSpace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def summary(self) -> dict[str, Any]:
        """What the run used: storage, the size of one stream, and on disk the peak bytes and files written."""
        out: dict[str, Any] = {"storage": self.storage, "requested": self.requested, "stream_bytes": self.stream_bytes}
        if self.on_disk:
            out.update(peak_disk_bytes=self.peak_bytes_on_disk, files_written=self.files_written)
        return out

    def __repr__(self) -> str:
        where = f"disk at {self.folder}" if self.on_disk else (self.storage or f"unresolved {self.requested!r}")
        return f"ActivationSpace({where})"


def _is_tmpfs(path: Path) -> bool:
    """Whether ``path`` is on a memory-backed file system (tmpfs/ramfs), per /proc/self/mounts."""
    try:
        real = os.path.realpath(path)
        best, fstype = "", ""
        with open("/proc/self/mounts", encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, fstype = mount, parts[2]
        return fstype in ("tmpfs", "ramfs")
    except OSError:
        return False


# --------------------------------------------------------------------------- the store
class ActivationStore:
    """A list-like sequence of per-batch tensors, in memory or on disk (see :class:`ActivationSpace`).

    On disk, ``store[i]`` and iteration read each tensor into a fresh tensor (iteration asks the kernel to read
    the next file ahead while the caller works on the current one); only the tensors the caller keeps stay in
    memory. Tensors come back with the dtype, shape and device they were appended with (contiguous).
    :meth:`close` (or a ``with`` block) releases the tensors and deletes the files.
    """

    def __init__(self, space: ActivationSpace) -> None:
        self.space = space
        self._disk = space.on_disk
        self._items: list[Any] = []  # tensors in memory, _Blob on disk
        self._closed = False

    @property
    def on_disk(self) -> bool:
        return self._disk

    def _check_open(self) -> None:
        if self._closed:
            raise ActivationStorageError("the activation store is closed")

    def append(self, tensor: torch.Tensor) -> None:
        self._check_open()
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"an ActivationStore holds tensors, got {type(tensor).__name__}")
        self._items.append(self.space._save(tensor) if self._disk else tensor)

    def extend(self, tensors: Any) -> None:
        for tensor in tensors:
            self.append(tensor)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> torch.Tensor:
        self._check_open()
        item = self._items[index]
        return self.space._load(item) if self._disk else item

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._check_open()
        if not self._disk:
            yield from list(self._items)
            return
        items = list(self._items)
        for i, blob in enumerate(items):
            current = self.space._load(blob)
            if i + 1 < len(items):
                _read_ahead(items[i + 1].path)  # the kernel reads the next file while the caller works
            yield current
            del current

    @property
    def nbytes(self) -> int:
        """Total bytes of the tensors held."""
        return sum(i.nbytes if self._disk else i.numel() * i.element_size() for i in self._items)

    def copy(self, count: int | None = None) -> ActivationStore:
        """A second store with the same tensors (the first ``count`` of them; all by default); on disk, the same
        files, deleted once every store holding them is closed."""
        return self.subset(range(len(self._items))[:count])

    def subset(self, indices: Sequence[int]) -> ActivationStore:
        """A second store with the tensors at ``indices``, in that order, shared as :meth:`copy` shares them."""
        self._check_open()
        other = ActivationStore(self.space)
        for item in (self._items[i] for i in indices):
            if self._disk:
                with self.space._lock:
                    item.refs += 1
            other._items.append(item)
        return other

    def close(self) -> None:
        """Release the tensors (on disk: delete the files no other store shares). Idempotent."""
        if self._closed:
            return
        self._closed = True
        items, self._items = self._items, []
        if self._disk:
            for blob in items:
                self.space._release(blob)

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "on disk" if self._disk else "in memory"
        return f"ActivationStore({len(self._items)} tensors {where}{', closed' if self._closed else ''})"
