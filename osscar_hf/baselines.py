"""``magnitude_prune``: the magnitude baseline at the shapes OSSCAR would give, as a one-call function.

It is the ``"magnitude"`` method of :mod:`osscar_hf.methods` run through the same pipeline as every other method
(keep the structures whose consumer columns have the largest L2 norm; no calibration data, no refit). Kept for
benchmarks and scripts that call it directly; ``OsscarConfig(method="magnitude")`` does the same.
"""

from __future__ import annotations

import torch.nn as nn

from .config import OsscarConfig
from .pruner import OsscarPruner

__all__ = ["magnitude_prune"]


def magnitude_prune(model: nn.Module, *, attention_sparsity: float = 0.0, mlp_sparsity: float = 0.0) -> nn.Module:
    """Prune ``model`` in place to the shapes OSSCAR would give, choosing structures by consumer-column norm."""
    config = OsscarConfig(attention_sparsity=attention_sparsity, mlp_sparsity=mlp_sparsity, method="magnitude")
    return OsscarPruner(config).prune(model, progress=False)
