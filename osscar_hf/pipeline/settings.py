"""The block loop's settings: the method, every block's kept sizes, the geometry and where things run."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..arch import ArchSpec, AttentionLayout, attention_layout
from ..budgets import BlockSize
from ..distributed.context import SINGLE, Ranks
from ..methods import PruningMethod, SolveSettings, get_method

__all__ = ["LoopSettings", "loop_settings"]


@dataclass(frozen=True)
class LoopSettings:
    """Everything the block loop needs, resolved from an :class:`~osscar_hf.config.OsscarConfig` and the model.

    ``sizes`` holds one :class:`BlockSize` per decoder block (empty until the budget is planned, see
    :mod:`osscar_hf.budgets`).
    """

    method: PruningMethod
    attention: SolveSettings
    mlp: SolveSettings
    attention_layout: AttentionLayout
    num_neurons: int
    device: torch.device
    storage_device: torch.device
    propagate: bool
    dense_targets: bool
    activation_storage: str = "memory"     # "auto", "memory" or "disk" (see osscar_hf.activations)
    activation_dir: str | None = None      # parent folder of the on-disk activations (None: the temp folder)
    sizes: tuple[BlockSize, ...] = ()
    num_experts: int = 1                   # experts of a mixture of experts, each with num_neurons neurons
    ranks: Ranks = SINGLE                  # the processes of a data-parallel run (see osscar_hf.distributed)

    @property
    def num_attention_groups(self) -> int:
        """KV groups of a dense block."""
        return self.attention_layout.kv_heads

    @property
    def n_rep(self) -> int:
        """Query heads per KV head in the dense model."""
        return self.attention_layout.n_rep

    @property
    def head_dim(self) -> int:
        return self.attention_layout.head_dim

    @property
    def attention_structures(self) -> int:
        """Attention structures of a dense block, the unit of :attr:`sizes` (see :class:`AttentionLayout`)."""
        return self.attention_layout.structures

    def size(self, index: int) -> BlockSize:
        """The kept sizes of block ``index``."""
        if not self.sizes:
            raise RuntimeError("the block sizes are not planned yet")
        return self.sizes[index]

    def with_sizes(self, sizes: list[BlockSize] | tuple[BlockSize, ...]) -> LoopSettings:
        return replace(self, sizes=tuple(sizes))


def loop_settings(config: Any, model_config: Any, spec: ArchSpec, ranks: Ranks = SINGLE) -> LoopSettings:
    """The :class:`LoopSettings` of ``config`` (an OsscarConfig) for a model of ``model_config`` (sizes not set), run
    by ``ranks``."""
    layout = attention_layout(spec, model_config, config.attention_structure)
    dtype = config.torch_solver_dtype()
    iters = config.local_search_iters if config.local_search else 0
    attention = SolveSettings(step=config.attention_step, swap_size=config.attention_swap_size,
                              local_search_iters=iters, damping=config.damping, dtype=dtype)
    mlp = SolveSettings(step=config.mlp_step, swap_size=config.mlp_swap_size, local_search_iters=iters,
                        damping=config.damping, dtype=dtype)
    return LoopSettings(
        method=get_method(config.method), attention=attention, mlp=mlp, attention_layout=layout,
        num_neurons=spec.ffn_dim(model_config), device=config.resolved_device(),
        storage_device=torch.device("cpu"), propagate=config.propagate, dense_targets=config.dense_targets,
        activation_storage=config.activation_storage, activation_dir=config.activation_dir,
        num_experts=int(getattr(model_config, spec.experts.config_count)) if spec.experts is not None else 1,
        ranks=ranks,
    )
