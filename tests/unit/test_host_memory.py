"""Host memory helpers: glibc's mmap threshold and trimming freed heap pages (Linux/glibc only, in subprocesses:
both settings are process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from osscar_hf.host_memory import _glibc, map_large_allocations

needs_glibc = pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only")

# Where a fresh 4 MiB tensor lives, after a freed 20 MiB one has (by default) raised glibc's mmap threshold.
WHERE = """
import torch
from pathlib import Path
from osscar_hf.host_memory import map_large_allocations
{setup}
big = torch.ones(20 << 18)  # 20 MiB, memory-mapped (above the initial 128 KiB threshold), then freed
del big
t = torch.ones(1 << 20)  # 4 MiB
ptr = t.data_ptr()
for line in Path("/proc/self/maps").read_text().splitlines():
    start, end = (int(x, 16) for x in line.split()[0].split("-"))
    if start <= ptr < end:
        print("heap" if line.rstrip().endswith("[heap]") else "own map")
"""


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}  # glibc's defaults
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return done.stdout.strip()


@needs_glibc
def test_large_tensors_get_their_own_memory_map():
    assert _run(WHERE.format(setup="")) == "heap"  # glibc's default: the threshold followed the freed 20 MiB
    setup = ("from osscar_hf.host_memory import heap_fragmentation_hint\n"
             "assert heap_fragmentation_hint() is not None\n"
             "assert map_large_allocations() and heap_fragmentation_hint() is None")
    assert _run(WHERE.format(setup=setup)) == "own map"


@needs_glibc
def test_freed_heap_pages_are_given_back():
    code = textwrap.dedent("""
        import torch
        from pathlib import Path
        from osscar_hf.host_memory import release_freed_memory

        def anon():
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

        big = torch.ones(20 << 18)
        del big  # the mmap threshold is now 20 MiB: the tensors below come from the heap
        kept = [torch.ones(1 << 18) for _ in range(64)]  # 64 x 1 MiB
        pin = torch.ones(1 << 18)  # above them: glibc's automatic trim of the top cannot help
        del kept
        before = anon()
        release_freed_memory()
        print((before - anon()) >> 20)
    """)
    assert int(_run(code)) >= 48  # MiB given back of the 64 freed


def test_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="positive number of bytes, got 0"):
        map_large_allocations(0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_rss_is_this_process_own_high_water_mark():
    code = textwrap.dedent("""
        import torch
        from osscar_hf.host_memory import peak_host_rss_bytes
        before = peak_host_rss_bytes()
        x = torch.ones(50 << 20)  # 200 MiB, touched
        del x
        print(before >> 20, peak_host_rss_bytes() >> 20)
    """)
    before, after = map(int, _run(code).split())
    assert 190 <= after - before <= 260
    # A child process starts from its own peak, not its parent's (getrusage's ru_maxrss would be inherited).
    parent = textwrap.dedent(f"""
        import subprocess, sys, torch
        from osscar_hf.host_memory import peak_host_rss_bytes
        x = torch.ones(100 << 20)  # 400 MiB in the parent
        child = subprocess.run([sys.executable, "-c", "from osscar_hf.host_memory import peak_host_rss_bytes; "
                                "print(peak_host_rss_bytes() >> 20)"], capture_output=True, text=True, check=True)
        print(peak_host_rss_bytes() >> 20, child.stdout.strip())
    """)
    parent_peak, child_peak = map(int, _run(parent).split())
    assert parent_peak - child_peak >= 300


@needs_glibc
def test_the_hint_goes_once_large_allocations_are_mapped(monkeypatch):
    from osscar_hf import host_memory

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(host_memory, "_mapped", False)
    assert "map_large_allocations()" in host_memory.heap_fragmentation_hint()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert host_memory.heap_fragmentation_hint() is None
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setattr(host_memory, "_mapped", True)  # as after a map_large_allocations() that took effect
    assert host_memory.heap_fragmentation_hint() is None


@needs_glibc
def test_mapped_for_a_with_block_then_glibc_ceiling():
    code = textwrap.dedent("""
        import torch
        from pathlib import Path
        from osscar_hf.host_memory import mapped_large_allocations

        def where():
            t = torch.ones(1 << 20)  # 4 MiB
            for line in Path("/proc/self/maps").read_text().splitlines():
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                if start <= t.data_ptr() < end:
                    return "heap" if line.rstrip().endswith("[heap]") else "map"

        first = where()  # glibc's initial threshold is 128 KiB: its own map
        with mapped_large_allocations() as on:
            inside = where()
        print(first, on, inside, where())  # after: fixed at 32 MiB, so from the heap
    """)
    assert _run(code).split() == ["map", "True", "map", "heap"]


@needs_glibc
def test_a_threshold_fixed_before_is_left_alone(monkeypatch):
    from osscar_hf import host_memory

    monkeypatch.setattr(host_memory, "_mapped", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")
    with host_memory.mapped_large_allocations() as on:
        assert on is False
