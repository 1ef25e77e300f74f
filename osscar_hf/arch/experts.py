"""Mixture-of-experts MLPs whose experts are one module of 3-D per-expert tensors (transformers 5's fused experts).

Such a module (``MixtralExperts``, ``Qwen3MoeExperts``, ``OlmoeExperts``) holds ``gate_up_proj`` (experts, 2 * I,
hidden), each expert's rows ``[gate | up]``, and ``down_proj`` (experts, hidden, I); its forward takes the tokens'
hidden states, the experts each token is routed to and the routing weights. Expert ``e``'s slices are laid out like
the weights of an ``nn.Linear`` (out x in), so one expert is one producer/consumer pair of the dense layout: a
structure is one neuron of one expert, and every expert keeps the same number of neurons (the stock config's one
intermediate size still describes the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

__all__ = ["Experts", "expert_block_problems", "expert_parameter", "expert_parameter_name", "sparse_layer_fields"]


@dataclass(frozen=True)
class Experts:
    """Where a family keeps its experts, and the config fields that describe them.

    ``path``: the experts module, from the block; the spec's ``mlp_producers`` and ``mlp_consumer`` then name
    parameters of that module (paths from the block, e.g. ``"mlp.experts.gate_up_proj"``), 3-D with the expert
    first. ``config_count`` / ``config_per_token``: config fields of the number of experts and of the experts each
    token is routed to. ``config_sparse_layers``: config fields that can give some blocks a dense MLP instead
    (Qwen3-MoE's ``mlp_only_layers``, ``decoder_sparse_step``), named when such a model is refused.
    ``checkpoint_names``: how the family's checkpoints store one expert's tensors, ``{parameter name: (stored
    names, with "{e}" for the expert, each holding a slice of the parameter's rows in order)}``; the stored names
    are relative to the experts module's stored prefix, which ``checkpoint_module`` gives when it differs from
    ``path`` (Mixtral stores ``block_sparse_moe.experts``).
    """

    path: str = "mlp.experts"
    config_count: str = "num_local_experts"
    config_per_token: str = "num_experts_per_tok"
    config_sparse_layers: tuple[str, ...] = ()
    checkpoint_names: dict[str, tuple[str, ...]] | None = None
    checkpoint_module: str | None = None

    def problems(self) -> list[str]:
        found = []
        for name in ("path", "config_count", "config_per_token"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                found.append(f"experts.{name} must be a non-empty str, got {value!r}")
        if not isinstance(self.config_sparse_layers, tuple) or not all(
                isinstance(v, str) and v for v in self.config_sparse_layers):
            found.append(f"experts.config_sparse_layers must be a tuple of str, got {self.config_sparse_layers!r}")
        names = self.checkpoint_names
        if names is not None and (not isinstance(names, dict) or not all(
                isinstance(k, str) and isinstance(v, tuple) and v and all(isinstance(s, str) and "{e}" in s for s in v)
                for k, v in names.items())):
            found.append(f"experts.checkpoint_names must map parameter names to tuples of names with '{{e}}', "
                         f"got {names!r}")
        return found


def expert_parameter_name(experts: Experts, path: str) -> str:
    """The parameter name inside the experts module of a spec path from the block (``mlp.experts.down_proj`` ->
    ``down_proj``)."""
    prefix = experts.path + "."
    return path[len(prefix):] if path.startswith(prefix) else path


def expert_parameter(block: nn.Module, experts: Experts, path: str) -> nn.Parameter:
    """The 3-D parameter at ``path`` (from the block) of the experts module."""
    module = block.get_submodule(experts.path)
    return getattr(module, expert_parameter_name(experts, path))


def sparse_layer_fields(config: Any, experts: Experts) -> str:
    """``"field=value, ..."`` of the config fields that decide which blocks have experts (for messages)."""
    return ", ".join(f"{name}={getattr(config, name, None)!r}" for name in experts.config_sparse_layers)


def expert_block_problems(block: nn.Module, experts: Experts, producers: list[tuple[str, int]], consumer: str,
                          where: str) -> list[str]:
    """What block ``where`` lacks for its experts: the module, 3-D producers (``(path, rows per neuron)``) and
    consumer with the same experts and neurons."""
    try:
        module = block.get_submodule(experts.path)
    except AttributeError:
        return [f"an experts module at {where}.{experts.path} (a dense MLP instead?)"]
    found = []
    down = getattr(module, expert_parameter_name(experts, consumer), None)
    if not isinstance(down, torch.Tensor) or down.dim() != 3:
        return [f"a 3-D per-expert tensor at {where}.{consumer}"]
    for path, stride in producers:
        param = getattr(module, expert_parameter_name(experts, path), None)
        if not isinstance(param, torch.Tensor) or param.dim() != 3 or param.shape[0] != down.shape[0] \
                or param.shape[1] != stride * down.shape[2]:
            found.append(f"a 3-D per-expert tensor at {where}.{path} with {stride} rows per neuron of each of the "
                         f"{down.shape[0]} experts")
    return found
