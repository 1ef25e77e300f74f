"""The process's host memory: its peak resident size, and handing freed memory back to the system."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def peak_host_rss_bytes() -> int | None:
    """The process's peak resident set size so far, or ``None`` where it is unavailable.

    On Linux ``VmHWM`` from /proc, which belongs to this process's own address space; ``getrusage``'s
    ``ru_maxrss`` (the fallback elsewhere) survives ``exec`` and can report the peak of the parent that started
    the process.
    """
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):  # pragma: no cover - no procfs
            pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


def release_freed_memory() -> None:
    """Give host memory that was freed back to the system (glibc ``malloc_trim``; nothing elsewhere).

    glibc serves tensors below its mmap threshold (which grows to 32 MiB as big tensors are freed) from the
    heap, and keeps the pages of freed chunks resident until they are trimmed: a block's forward or a solve
    leaves tens to hundreds of MiB of them, which would otherwise sit under the next solve's peak.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, loaded once; ``None`` elsewhere (other systems, or a Linux with another C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - not glibc
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


# glibc's mallopt parameter for the mmap threshold (malloc.h: M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
GLIBC_THRESHOLD_CEILING = 32 << 20  # the most glibc's own (dynamic) threshold rises to, on 64-bit
_ENV_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"
_mapped = False  # map_large_allocations() took effect in this process


def _set_threshold(threshold: int) -> bool:
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def map_large_allocations(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own memory map, returned to the system
    when freed (glibc ``mallopt(M_MMAP_THRESHOLD)``), from now until the process ends; ``True`` when it took
    effect.

    By default glibc raises that threshold up to 32 MiB as big blocks are freed, so a block's activations and
    the solver's panels end up in the heap, where freed pages stay resident and fragment: about 0.2 GiB more
    peak memory at OPT-2.7B shapes (``benchmarks/memory.py``). ``prune_checkpoint`` sets
    this for its own duration (:func:`mapped_large_allocations`); the command line sets it for its process.
    Starting the interpreter with ``MALLOC_MMAP_THRESHOLD_=1048576`` does the same.
    """
    global _mapped
    if threshold <= 0:
        raise ValueError(f"threshold must be a positive number of bytes, got {threshold!r}")
    done = _set_threshold(threshold)
    _mapped = _mapped or done
    return done


@contextmanager
def mapped_large_allocations() -> Iterator[bool]:
    """:func:`map_large_allocations` for the body of a ``with`` block; yields whether it took effect.

    glibc cannot go back to its dynamic threshold, so on exit the threshold is fixed at 32 MiB, the most the
    dynamic one climbs to (it rises to the size of each memory-mapped block freed, up to 32 MiB, which a torch
    program reaches as soon as it frees a tensor of that size). Nothing is
    changed where a threshold was already fixed (``MALLOC_MMAP_THRESHOLD_``, or :func:`map_large_allocations`
    called before) or outside glibc.
    """
    global _mapped
    if heap_fragmentation_hint() is None or not map_large_allocations():
        yield False
        return
    try:
        yield True
    finally:
        _set_threshold(GLIBC_THRESHOLD_CEILING)
        _mapped = False


def heap_fragmentation_hint() -> str | None:
    """A one-line hint to call :func:`map_large_allocations` where it would lower the peak (Linux, and neither it
    nor glibc's ``MALLOC_MMAP_THRESHOLD_`` has set a fixed threshold); ``None`` otherwise."""
    if _glibc() is None or _mapped or _ENV_THRESHOLD in os.environ:
        return None
    return ("glibc's default malloc settings keep freed heap pages resident, about 0.2 GiB of peak memory at "
            "OPT-2.7B shapes; map_large_allocations=True (the default of prune_checkpoint), "
            f"osscar_hf.host_memory.map_large_allocations() or {_ENV_THRESHOLD}={MMAP_THRESHOLD_BYTES} avoid that")
