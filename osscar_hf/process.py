"""Defaults for the processes osscar_hf owns: the ``osscar-hf`` command line (and so the demo) and the benchmarks.

Library code never changes the environment of a user's process; only these entry points call
:func:`quiet_idle_threads`, before torch is imported.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

__all__ = ["quiet_idle_threads"]


def quiet_idle_threads() -> bool:
    """Make OpenMP's idle threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), unless the user chose.

    torch's OpenMP threads spin while they wait for work by default. When another process keeps a core busy,
    every small parallel region then waits for a descheduled spinning thread: on 2 shared cores the solver's
    MLP stage A took 8-16 s instead of 0.4 s (``benchmarks/results/solver_speed.md``). OpenMP reads the
    variable once, when torch loads it, so this only takes effect before the first ``import torch``. Returns
    whether the default was set; ``OMP_WAIT_POLICY=ACTIVE`` (or any value) in the environment is kept.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return False
    if "torch" in sys.modules:
        logger.debug("torch is already imported: OMP_WAIT_POLICY left unset (it would have no effect now)")
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
