"""The process's host memory: its peak resident size, and handing freed memory back to the system."""

from __future__ import annotations

import ctypes
import os
import sys


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
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            pass


# glibc's mallopt parameter for the mmap threshold (malloc.h: M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
_ENV_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"
_mapped = False  # map_large_allocations() took effect in this process


def map_large_allocations(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own memory map, returned to the system
    when freed (glibc ``mallopt(M_MMAP_THRESHOLD)``); ``True`` when it took effect.

    By default glibc raises that threshold up to 32 MiB as big blocks are freed, so a block's activations and
    the solver's panels end up in the heap, where freed pages stay resident and fragment: 0.2 GiB more peak
    memory at OPT-2.7B shapes (``benchmarks/memory.py``: 1.46 against 1.23 GiB). The setting is process-wide
    and lasts until the process ends, so the library never sets it on its own: the command line does, for its
    own process. From Python, call this before pruning, or start the interpreter with the environment variable
    ``MALLOC_MMAP_THRESHOLD_=1048576``.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be a positive number of bytes, got {threshold!r}")
    if not sys.platform.startswith("linux"):
        return False
    global _mapped
    try:
        done = bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    _mapped = _mapped or done
    return done


def heap_fragmentation_hint() -> str | None:
    """A one-line hint to call :func:`map_large_allocations` where it would lower the peak (Linux, and neither it
    nor glibc's ``MALLOC_MMAP_THRESHOLD_`` has set a fixed threshold); ``None`` otherwise."""
    if not sys.platform.startswith("linux") or _mapped or _ENV_THRESHOLD in os.environ:
        return None
    return ("glibc's default malloc settings keep freed heap pages resident, about 0.2 GiB of peak memory for "
            "OPT-2.7B shapes; call osscar_hf.host_memory.map_large_allocations() first (as osscar-hf prune does) or "
            f"set {_ENV_THRESHOLD}={MMAP_THRESHOLD_BYTES} to avoid that")
