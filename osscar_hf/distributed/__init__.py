"""Data-parallel pruning under ``torch.distributed`` (launched by ``torchrun`` or ``accelerate launch``).

Each rank runs the block forwards on its share of the calibration windows; the statistics are summed over the ranks
(:mod:`.reduce`); a block's consumers are solved on different ranks and the answers broadcast (:mod:`.share`), so
every rank prunes its copy of the block identically; a failure on any rank stops them all (:mod:`.agree`). Which
process is which, and the process group's lifetime, are in :mod:`.context`. See ``docs/distributed.md``.
"""

from .agree import agree, guard, step
from .context import SINGLE, Ranks, current_ranks, is_main_process, process_ranks
from .reduce import reduce_statistics, sum_in_place
from .share import broadcast, gather_rows, solve_shared

__all__ = [
    "SINGLE", "Ranks", "agree", "broadcast", "current_ranks", "gather_rows", "guard", "is_main_process",
    "process_ranks", "reduce_statistics", "solve_shared", "step", "sum_in_place",
]
