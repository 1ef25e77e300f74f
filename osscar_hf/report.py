"""Machine-readable record of a pruning run: per-block kept structures, objectives and times."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ConsumerReport:
    """One layer-wise problem (the attention output projection or the MLP down projection of a block)."""

    structures: int                  # m: heads / KV groups, or neurons, before pruning
    kept: int                        # structures kept
    kept_indices: list[int]          # which ones (sorted)
    solved: bool                     # False when nothing was removed (weights left bit-identical)
    objective_dense: float | None = None
    objective_stage_a: float | None = None
    objective: float | None = None
    relative_error: float | None = None   # ||X (W - W_hat)||^2 / ||X W_hat||^2 on the calibration inputs
    relative_error_masked: float | None = None  # the same for the kept structures without the refit
    swaps_accepted: int = 0
    damping: float | None = None
    seconds: float = 0.0
    # A mixture of experts' MLP: the experts, each keeping kept / experts of its structures / experts neurons
    # (``kept_indices``: expert * neurons per expert + neuron).
    experts: int = 1

    @property
    def kept_per_expert(self) -> int:
        """The structures each expert keeps (``kept`` when there are no experts)."""
        return self.kept // self.experts


@dataclass
class BlockReport:
    """What pruning one block did: its layer-wise problems (two, three with a shared expert), its time and memory."""

    index: int
    attention: ConsumerReport
    mlp: ConsumerReport
    seconds: float
    peak_device_memory_bytes: int | None = None   # during this block (CUDA only)
    peak_host_rss_bytes: int | None = None         # the process's peak resident memory so far (where known)
    shared_expert: ConsumerReport | None = None    # a mixture of experts' shared expert (None without one)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockReport:
        """The report that ``dataclasses.asdict`` turned into ``data`` (as a streamed run's progress file keeps it)."""
        fields = dict(data)
        for name in ("attention", "mlp", "shared_expert"):
            if fields.get(name) is not None:
                fields[name] = ConsumerReport(**fields[name])
        return cls(**fields)


@dataclass
class ChannelBlockReport:
    """What pruning one CNN block did: its channel problems in the order they were solved (see
    :mod:`osscar_hf.arch.vision`), its time and memory."""

    index: int
    problems: list[ConsumerReport]
    seconds: float
    peak_device_memory_bytes: int | None = None
    peak_host_rss_bytes: int | None = None

    @property
    def widths(self) -> list[int]:
        """The block's kept inner widths, one per channel problem."""
        return [problem.kept for problem in self.problems]


@dataclass
class PruneReport:
    """What :meth:`OsscarPruner.prune` did. ``to_dict``/``to_json`` give a JSON record of it."""

    model_type: str
    config: dict[str, Any]
    calibration: dict[str, Any]
    parameters_before: int
    parameters_after: int
    total_seconds: float
    blocks: list[BlockReport] | list[ChannelBlockReport] = field(default_factory=list)
    # Where the calibration activations were kept (ActivationSpace.summary()): "storage" ("memory" or "disk"),
    # "requested" (the activation_storage setting), "stream_bytes" (one stream), and on disk "peak_disk_bytes"
    # and "files_written". None where not recorded.
    activations: dict[str, Any] | None = None
    # How the sizes were chosen and what they cost (see osscar_hf.pipeline.orchestrate.budget_summary): "method",
    # "allocation", the decoder blocks' parameters and multiply-adds per token before/after ("block_params_before",
    # ...), with a global budget its "sparsity" and "sparsity_target", and "plan_seconds". None where not recorded.
    budget: dict[str, Any] | None = None

    @property
    def block_shapes(self) -> list[dict[str, int]] | list[dict[str, list[int]]]:
        """Kept attention structures and neurons of each block (a CNN block: ``{"channels": kept widths}``)."""
        return [{"channels": b.widths} if isinstance(b, ChannelBlockReport)
                else {"attention": b.attention.kept, "mlp": b.mlp.kept_per_expert} for b in self.blocks]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON, atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.to_dict(), handle, indent=2)
                handle.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
