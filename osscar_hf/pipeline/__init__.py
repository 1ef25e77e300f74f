"""The one pruning pipeline: settings, the per-block step and the orchestration that serves in-memory and
streamed pruning alike (see :mod:`.orchestrate`; a run's state and its block sources are in :mod:`.run`)."""

from ..io.model_config import switch_on_part_biases, update_model_config  # re-exported: their old place
from .block import PARTS, BlockStream, announce_block, block_consumers, block_device
from .orchestrate import (
    activation_space,
    build_report,
    calibration_seq_len,
    capture,
    check_config_fits,
    check_sizes,
    finish_run,
    plan_sizes,
    prune_blocks,
    start_run,
)
from .run import BlockSource, InMemoryBlocks, PruneRun, scratch_copy
from .settings import LoopSettings, loop_settings
from .statistics import InputStatistics, input_hooks

__all__ = [
    "PARTS", "BlockSource", "BlockStream", "InMemoryBlocks", "InputStatistics", "LoopSettings", "PruneRun",
    "activation_space", "announce_block", "block_consumers", "block_device", "build_report", "calibration_seq_len",
    "capture", "check_config_fits", "check_sizes", "finish_run", "input_hooks", "loop_settings", "plan_sizes", "prune_blocks",
    "scratch_copy", "start_run", "switch_on_part_biases", "update_model_config",
]
