"""How a model's attention is cut into structures: whole KV groups, or query heads inside every KV group.

``OsscarConfig.attention_structure`` picks one. A *structure* is the unit the budgets count (``BlockSize.attention``,
``attention_sparsity``, ``block_sizes``): a KV group (its key and value heads and the ``n_rep`` query heads sharing
them), or, with ``"query_heads"``, one query head of every KV group (a block keeping ``k`` of them keeps ``k`` query
heads per KV head, ``k * kv_heads`` in all). The solver sees the consumer's input channels grouped differently: KV
groups of ``n_rep * head_dim`` channels, or query heads of ``head_dim`` channels in ``kv_heads`` partitions of which
each keeps the same number (:mod:`osscar_hf.solver.partitions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import OsscarConfigError
from ..remote_code.configuration_osscar import kept_query_heads
from .spec import ArchSpec

__all__ = ["ATTENTION_STRUCTURES", "AttentionLayout", "attention_layout"]

ATTENTION_STRUCTURES = ("kv_groups", "query_heads")


@dataclass(frozen=True)
class AttentionLayout:
    """A model's attention geometry and the structure its pruning removes (see the module docstring)."""

    kv_heads: int
    n_rep: int
    head_dim: int
    structure: str = "kv_groups"

    @property
    def query_heads(self) -> bool:
        return self.structure == "query_heads"

    @property
    def structures(self) -> int:
        """Structures per block, the unit of the budgets: KV groups, or query heads per KV group."""
        return self.n_rep if self.query_heads else self.kv_heads

    @property
    def solver_groups(self) -> int:
        """Groups of the consumer's input channels the solver selects among: KV groups or query heads."""
        return self.kv_heads * self.n_rep if self.query_heads else self.kv_heads

    @property
    def group_size(self) -> int:
        """Input channels of the output projection per solver group."""
        return self.head_dim if self.query_heads else self.n_rep * self.head_dim

    @property
    def partitions(self) -> int:
        """Partitions of the solver groups that keep equal counts: the KV groups, for query heads."""
        return self.kv_heads if self.query_heads else 1

    def solver_keep(self, kept: int) -> int:
        """Solver groups kept when a block keeps ``kept`` structures."""
        return kept * self.kv_heads if self.query_heads else kept

    def shape(self, kept: int) -> dict[str, int]:
        """Query and KV heads of a block that keeps ``kept`` structures (no KV head is left without a query head)."""
        if self.query_heads:
            return {"num_attention_heads": kept * self.kv_heads, "num_key_value_heads": self.kv_heads if kept else 0}
        return {"num_attention_heads": kept * self.n_rep, "num_key_value_heads": kept}

    def structures_of_solver_kept(self, kept_groups: int) -> int:
        """Structures kept (the budgets' unit) from the number of solver groups kept (what a block report records)."""
        return kept_groups // self.kv_heads if self.query_heads else kept_groups

    def shape_of_solver_kept(self, kept_groups: int) -> dict[str, int]:
        """:meth:`shape` from the number of solver groups kept (what a block report records)."""
        return self.shape(self.structures_of_solver_kept(kept_groups))

    def selection(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept KV groups, kept query heads) of the solver's kept groups ``kept`` (increasing indices)."""
        kept = torch.as_tensor(kept, dtype=torch.int64, device="cpu")
        if not self.query_heads:
            return kept, kept_query_heads(kept, self.n_rep)
        return torch.unique_consecutive(kept // self.n_rep), kept

    def dense_shape(self) -> dict[str, int]:
        return {"num_attention_heads": self.kv_heads * self.n_rep, "num_key_value_heads": self.kv_heads}


def attention_layout(spec: ArchSpec, model_config: Any, structure: str = "kv_groups") -> AttentionLayout:
    """The :class:`AttentionLayout` of a model of ``model_config``; ``OsscarConfigError`` when ``structure`` is not
    one of :data:`ATTENTION_STRUCTURES` or is ``"query_heads"`` for a model with one query head per KV head."""
    if structure not in ATTENTION_STRUCTURES:
        raise OsscarConfigError(f"attention_structure must be one of {list(ATTENTION_STRUCTURES)}, got {structure!r}")
    kv, n_rep, head_dim = spec.group_geometry(model_config)
    if structure == "query_heads" and n_rep == 1:
        raise OsscarConfigError(
            f"attention_structure='query_heads' removes query heads inside KV groups, but this model has one query "
            f"head per KV head ({spec.config_heads}={spec.num_heads(model_config)}, {kv} KV heads): use "
            "attention_structure='kv_groups', which removes whole heads")
    return AttentionLayout(kv_heads=kv, n_rep=n_rep, head_dim=head_dim, structure=structure)
