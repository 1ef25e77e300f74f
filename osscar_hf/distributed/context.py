"""Which process of a data-parallel run this is (:class:`Ranks`), and the process group's lifetime.

A run is distributed when ``torch.distributed`` has a process group with more than one rank: one the caller
initialised (``accelerate launch``, a training script), or one :func:`process_ranks` initialises itself from the
environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and destroys afterwards.
Everything else is a single process, which runs exactly as without this package.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import OsscarConfigError

__all__ = ["ENVIRONMENT", "SINGLE", "Ranks", "current_ranks", "is_main_process", "process_ranks"]

logger = logging.getLogger(__name__)

# The variables torchrun (and accelerate launch) set for every process; all of them make a distributed run.
ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# How long a collective waits for a rank that neither answers nor fails (a hung or killed process). A rank that
# fails tells the others at once (see :mod:`.agree`); this bounds only what cannot be told.
TIMEOUT_ENV = "OSSCAR_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run: ``rank`` of ``world_size``, and the device the collectives
    run on (the CPU under gloo, this rank's GPU under NCCL)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files, shows progress and logs."""
        return self.rank == 0

    def share(self, count: int) -> range:
        """This rank's contiguous share of ``count`` items (the first ranks get one more when it does not
        divide)."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def owner(self, item: int) -> int:
        """The rank that computes item ``item`` of a list shared round-robin (a block's consumers, say)."""
        return item % self.world_size


SINGLE = Ranks()


def current_ranks() -> Ranks:
    """The ranks of the initialised default process group, or :data:`SINGLE` when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def _environment() -> dict[str, str] | None:
    """torchrun's variables when they describe more than one process, else None."""
    values = {name: os.environ.get(name) for name in ENVIRONMENT}
    if values["WORLD_SIZE"] is None:
        return None
    if any(v is None for v in values.values()):
        missing = [name for name, v in values.items() if v is None]
        raise OsscarConfigError(f"WORLD_SIZE={values['WORLD_SIZE']!r} is set but {', '.join(missing)} "
                                "is not: launch with torchrun (or accelerate launch), which sets all of "
                                f"{', '.join(ENVIRONMENT)}")
    try:
        world = int(values["WORLD_SIZE"])
    except ValueError:
        raise OsscarConfigError(f"WORLD_SIZE must be a whole number, got {values['WORLD_SIZE']!r}") from None
    return values if world > 1 else None


def is_main_process() -> bool:
    """Whether this process is rank 0 (or alone), also before any process group exists (for the command line)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _timeout() -> timedelta:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        raise OsscarConfigError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if seconds <= 0:
        raise OsscarConfigError(f"{TIMEOUT_ENV} must be positive, got {text!r}")
    return timedelta(seconds=seconds)


@contextmanager
def process_ranks(device: torch.device) -> Iterator[Ranks]:
    """The run's :class:`Ranks`: those of an initialised process group; else, under torchrun's environment, a
    group initialised here (NCCL when ``device`` is a GPU, gloo otherwise) and destroyed on exit; else
    :data:`SINGLE`."""
    if dist.is_available() and dist.is_initialized():
        yield current_ranks()
        return
    env = _environment()
    if env is None or not dist.is_available():
        yield SINGLE
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=_timeout())
    try:
        ranks = current_ranks()
        logger.info("distributed run: rank %d of %d (%s)", ranks.rank, ranks.world_size, backend)
        yield ranks
    finally:
        dist.destroy_process_group()

