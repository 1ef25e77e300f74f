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

__all__ = ["EXPERT_ALIGNMENT", "Experts", "SharedExpert", "checkpoint_tensors", "dense_layers_problem", "expert_block_problems", "expert_parameter",
           "expert_parameter_name", "model_tensors", "shared_expert_keep", "sparse_layer_fields"]

# Kept neurons per expert are multiples of this (or the full width): transformers' grouped_mm experts kernels (the
# default on CPU and GPU) need rows of a multiple of 16 bytes, 8 values in bfloat16/float16 and 4 in float32. A shared
# expert's kept width is a multiple of it too.
EXPERT_ALIGNMENT = 8


@dataclass(frozen=True)
class SharedExpert:
    """A dense MLP beside the routed experts that every token goes through (Qwen1.5/2-MoE's ``shared_expert``), its
    output scaled per token by ``sigmoid(gate(x))``.

    ``path``: the MLP, from the block; ``producers`` and ``consumer``: its linears, from the MLP (an ``nn.Linear``
    each, one row / column per neuron); ``gate``: the linear (hidden -> 1) whose sigmoid scales its output, from the
    block; ``config_ffn``: the config field of its width; ``count_attr``: the MLP's attribute that holds the width.
    It is pruned like a dense MLP (its own Gram, each token's input scaled by its gate) and keeps the same fraction of
    its neurons as every routed expert (:func:`osscar_hf.pipeline.experts.shared_expert_keep`).
    """

    path: str = "mlp.shared_expert"
    producers: tuple[str, ...] = ("gate_proj", "up_proj")
    consumer: str = "down_proj"
    gate: str = "mlp.shared_expert_gate"
    config_ffn: str = "shared_expert_intermediate_size"
    count_attr: str = "intermediate_size"

    def problems(self) -> list[str]:
        found = [f"experts.shared.{name} must be a non-empty str, got {getattr(self, name)!r}"
                 for name in ("path", "consumer", "gate", "config_ffn", "count_attr")
                 if not isinstance(getattr(self, name), str) or not getattr(self, name)]
        if not isinstance(self.producers, tuple) or not self.producers or not all(
                isinstance(p, str) and p for p in self.producers):
            found.append(f"experts.shared.producers must be a non-empty tuple of str, got {self.producers!r}")
        return found

    def linears(self) -> list[str]:
        """Paths from the block of every linear of the shared expert: producers, consumer, gate."""
        return [*(f"{self.path}.{p}" for p in self.producers), f"{self.path}.{self.consumer}", self.gate]


def shared_expert_keep(kept: int, full: int, shared_full: int) -> int:
    """Neurons a shared expert of ``shared_full`` keeps when every routed expert keeps ``kept`` of its ``full``: the
    same fraction, rounded to a multiple of :data:`EXPERT_ALIGNMENT` (at least one multiple while any routed neuron is
    kept); all of them when the routed experts keep all theirs, none when they keep none."""
    if kept >= full or shared_full == 0:
        return shared_full
    if kept <= 0:
        return 0
    step = min(EXPERT_ALIGNMENT, shared_full)
    return min(shared_full, max(step, step * round(shared_full * kept / (full * step))))


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
    ``path`` (Mixtral stores ``block_sparse_moe.experts``). ``shared``: a dense expert every token goes through
    (:class:`SharedExpert`), or None.
    """

    path: str = "mlp.experts"
    config_count: str = "num_local_experts"
    config_per_token: str = "num_experts_per_tok"
    config_sparse_layers: dict[str, Any] | None = None
    checkpoint_names: dict[str, tuple[str, ...]] | None = None
    checkpoint_module: str | None = None
    shared: SharedExpert | None = None

    def problems(self) -> list[str]:
        found = []
        if self.shared is not None:
            found += (self.shared.problems() if isinstance(self.shared, SharedExpert)
                      else [f"experts.shared must be None or a SharedExpert, got {self.shared!r}"])
        for name in ("path", "config_count", "config_per_token"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                found.append(f"experts.{name} must be a non-empty str, got {value!r}")
        layers = self.config_sparse_layers
        if layers is not None and (not isinstance(layers, dict) or not all(isinstance(k, str) and k for k in layers)):
            found.append(f"experts.config_sparse_layers must be None or a dict of config fields, got {layers!r}")
        names = self.checkpoint_names
        if names is not None and (not isinstance(names, dict) or not all(
                isinstance(k, str) and isinstance(v, tuple) and v
                and all(isinstance(s, str) and s.startswith("{e}.") for s in v)
                for k, v in names.items())):
            found.append(f"experts.checkpoint_names must map parameter names to tuples of names starting with "
                         f"'{{e}}.', got {names!r}")
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
    return ", ".join(f"{name}={getattr(config, name, None)!r}" for name in experts.config_sparse_layers or {})


def dense_layers_problem(config: Any, experts: Experts) -> str | None:
    """Why a config gives some blocks a dense MLP instead of experts (``Experts.config_sparse_layers``), or None."""
    layers = experts.config_sparse_layers or {}
    wrong = [name for name, value in layers.items() if getattr(config, name, value) not in (value, None)]
    if not wrong:
        return None
    wanted = ", ".join(f"{name}={value!r}" for name, value in layers.items())
    return (f"only checkpoints whose every layer has experts are supported ({wanted}); this config has "
            f"{sparse_layer_fields(config, experts)}, which gives some layers a dense MLP")


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


def _block_relative(spec: Any, name: str) -> tuple[str, str] | None:
    """``(block prefix, name inside the block)`` of a full parameter name inside a decoder block, else None."""
    prefix = spec.blocks + "."
    if not name.startswith(prefix):
        return None
    index, _, rest = name[len(prefix):].partition(".")
    return (f"{prefix}{index}.", rest) if index.isdigit() else None


def _stored_parts(experts: Experts) -> tuple[str, str]:
    """(the MLP module's path in the model, in the checkpoint): Mixtral's ``mlp`` is ``block_sparse_moe``."""
    stored = experts.checkpoint_module or experts.path
    return experts.path.rpartition(".")[0], stored.rpartition(".")[0]


def checkpoint_tensors(spec: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (full model names) under the names the family's checkpoints use: each fused per-expert parameter
    split into its experts' tensors (``Experts.checkpoint_names``), the MLP module renamed where the checkpoint names
    it otherwise. Other tensors pass unchanged. (Meta tensors will do, for the shapes.)"""
    experts = spec.experts
    if experts is None or experts.checkpoint_names is None:
        return dict(state)
    model_mlp, stored_mlp = _stored_parts(experts)
    stored_experts = experts.checkpoint_module or experts.path
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        where = _block_relative(spec, name)
        if where is None:
            out[name] = tensor
            continue
        prefix, rest = where
        param = expert_parameter_name(experts, rest)
        if param != rest and param in experts.checkpoint_names:
            formats = experts.checkpoint_names[param]
            for e in range(tensor.shape[0]):
                for fmt, piece in zip(formats, tensor[e].chunk(len(formats), dim=0)):
                    out[f"{prefix}{stored_experts}.{fmt.format(e=e)}"] = piece.clone()
        elif model_mlp and rest.startswith(model_mlp + "."):
            out[f"{prefix}{stored_mlp}{rest[len(model_mlp):]}"] = tensor
        else:
            out[name] = tensor
    return out


def model_tensors(spec: Any, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`checkpoint_tensors`: the checkpoint's per-expert tensors of ``stored`` (full names)
    stacked into the model's fused parameters, the MLP module renamed back. Every expert's tensors must be there."""
    experts = spec.experts
    if experts is None or experts.checkpoint_names is None:
        return dict(stored)
    model_mlp, stored_mlp = _stored_parts(experts)
    stored_experts = (experts.checkpoint_module or experts.path) + "."
    out: dict[str, torch.Tensor] = {}
    pieces: dict[tuple[str, str], dict[tuple[int, int], torch.Tensor]] = {}
    # An expert's stored name after "{e}." -> (the parameter it is part of, its place among the parameter's parts).
    tails = {fmt.replace("{e}.", "", 1): (param, f) for param, formats in experts.checkpoint_names.items()
             for f, fmt in enumerate(formats)}
    for name, tensor in stored.items():
        where = _block_relative(spec, name)
        rest = where[1] if where is not None else ""
        if where is not None and rest.startswith(stored_experts):
            index, _, tail = rest[len(stored_experts):].partition(".")
            if index.isdigit() and tail in tails:
                param, part = tails[tail]
                pieces.setdefault((where[0], param), {})[(int(index), part)] = tensor
                continue
        if where is not None and stored_mlp and rest.startswith(stored_mlp + "."):
            out[f"{where[0]}{model_mlp}{rest[len(stored_mlp):]}"] = tensor
        else:
            out[name] = tensor
    for (prefix, param), parts in pieces.items():
        count = 1 + max(e for e, _ in parts)
        width = len(experts.checkpoint_names[param])
        out[f"{prefix}{experts.path}.{param}"] = torch.stack(
            [torch.cat([parts[(e, f)] for f in range(width)], dim=0) for e in range(count)])
    return out
