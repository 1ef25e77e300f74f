"""The OpenMP default that osscar_hf's own processes (the command line, the demo, the benchmarks) set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from osscar_hf.process import quiet_idle_threads

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, env_policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


CLI_HELP = """
import os
from osscar_hf import cli
try:
    cli.main(["--help"])
except SystemExit:
    pass
print(os.environ.get("OMP_WAIT_POLICY"))
"""


@pytest.mark.parametrize("user, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_line_makes_idle_threads_sleep_unless_told(user, expected) -> None:
    assert _python(CLI_HELP, user).splitlines()[-1] == expected


def test_the_default_is_set_before_torch_and_never_after(monkeypatch) -> None:
    before_torch = "from osscar_hf.process import quiet_idle_threads; import os, sys\n" \
                   "print('torch' in sys.modules, quiet_idle_threads(), os.environ['OMP_WAIT_POLICY'])"
    assert _python(before_torch, None) == "False True PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert "torch" in sys.modules  # this test process: too late to have an effect, so nothing is changed
    assert quiet_idle_threads() is False and "OMP_WAIT_POLICY" not in os.environ
