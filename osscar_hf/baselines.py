"""A magnitude baseline at the same shapes as OSSCAR: keep the structures whose consumer columns have the
largest L2 norm, no calibration and no refit. Used by benchmarks to show what the optimisation buys."""

from __future__ import annotations

import torch
import torch.nn as nn

from .arch import get_spec, get_submodule
from .config import OsscarConfig, keep_count
from .pruner import update_model_config
from .surgery import prune_attention, prune_mlp


def magnitude_keep(consumer_weight: torch.Tensor, group_size: int, num_keep: int) -> torch.Tensor:
    """Sorted indices of the ``num_keep`` groups of input columns with the largest L2 norm."""
    out_features, p = consumer_weight.shape
    norms = consumer_weight.detach().float().reshape(out_features, p // group_size, group_size).pow(2).sum((0, 2))
    return torch.topk(norms, num_keep).indices.sort().values.cpu()


@torch.no_grad()
def magnitude_prune(model: nn.Module, *, attention_sparsity: float = 0.0, mlp_sparsity: float = 0.0) -> nn.Module:
    """Prune ``model`` in place to the shapes OSSCAR would give, choosing structures by consumer-column norm."""
    OsscarConfig(attention_sparsity=attention_sparsity, mlp_sparsity=mlp_sparsity)  # validates the fractions
    spec = get_spec(model)
    m, n_rep, head_dim = spec.group_geometry(model.config)
    neurons = spec.ffn_dim(model.config)
    keep_groups, keep_neurons = keep_count(m, attention_sparsity), keep_count(neurons, mlp_sparsity)
    for block in get_submodule(model, spec.blocks):
        if keep_groups < m:
            o_proj = get_submodule(block, f"{spec.attention}.{spec.o_proj}")
            kept = magnitude_keep(o_proj.weight, n_rep * head_dim, keep_groups)
            prune_attention(block, spec, kept, n_rep=n_rep, head_dim=head_dim, num_groups=m)
        if keep_neurons < neurons:
            down = get_submodule(block, spec.mlp_consumer)
            prune_mlp(block, spec, magnitude_keep(down.weight, 1, keep_neurons))
    if keep_groups < m or keep_neurons < neurons:
        update_model_config(model, spec, n_rep=n_rep, head_dim=head_dim)
    return model
