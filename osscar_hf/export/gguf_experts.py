"""Mixtures of experts in llama.cpp's ``llama`` (Mixtral), ``qwen3moe``, ``qwen2moe`` and ``olmoe`` architectures:
the routing they compute and the metadata they read (llama.cpp vendored by llama-cpp-python 0.3.36,
``src/models/{llama,qwen3moe,qwen2moe,olmoe}.cpp``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..arch import get_submodule
from ..arch.experts import expert_parameter
from ..errors import GGUFExportError
from ..io.shapes import spec_of

__all__ = ["check_experts", "write_expert_keys"]

#: Whether an architecture renormalises the routing weights of a token's chosen experts to sum to 1 (llama.cpp
#: hard-codes it for each; transformers' ``norm_topk_prob``, always true for Mixtral).
_NORMALISED_TOPK = {"llama": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}


def check_experts(model: nn.Module, model_type: str, arch: str) -> None:
    """Refuse a mixture of experts whose routing llama.cpp's architecture computes otherwise."""
    normalised = bool(getattr(spec_of(model).shape_config(model.config), "norm_topk_prob", True))
    if normalised != _NORMALISED_TOPK[arch]:
        raise GGUFExportError(f"this {model_type} model has norm_topk_prob={normalised}, but llama.cpp's {arch!r} "
                              f"{'renormalises' if _NORMALISED_TOPK[arch] else 'does not renormalise'} the chosen "
                              "experts' routing weights: it would compute another model")


def write_expert_keys(writer: Any, model: nn.Module, arch: str) -> None:
    """The experts (count, per token, width) and a shared expert's width, read from the model."""
    spec = spec_of(model)
    config = spec.shape_config(model.config)
    block = get_submodule(model, spec.blocks)[0]
    writer.add_expert_count(int(getattr(config, spec.experts.config_count)))
    writer.add_expert_used_count(int(getattr(config, spec.experts.config_per_token)))
    if arch in ("qwen2moe", "qwen3moe"):  # their feed_forward_length is the dense MLP's (none here)
        writer.add_expert_feed_forward_length(int(expert_parameter(block, spec.experts, spec.mlp_consumer).shape[2]))
    shared = spec.shared_expert_spec()
    if shared is not None:
        writer.add_expert_shared_feed_forward_length(int(get_submodule(block, shared.mlp_consumer).in_features))
