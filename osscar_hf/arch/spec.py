"""What osscar_hf needs to know about one architecture family, as data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule`` that also accepts an empty path (the root itself)."""
    return root.get_submodule(path) if path else root


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (which must exist) by ``module``."""
    parent_path, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent_path), name, module)


@dataclass(frozen=True)
class ArchSpec:
    """Where a decoder-only family keeps its blocks and which linears consume/produce each structure.

    Paths are dotted module paths: ``blocks`` from the ``*ForCausalLM`` model, every other path from one
    decoder block. A structure of the attention is one KV group: the ``n_rep`` query heads that share one
    key/value head (a single head when the model has as many KV heads as query heads). A structure of the
    MLP is one neuron.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    attention: str
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    mlp_producers: tuple[str, ...]
    mlp_consumer: str
    # Module attributes that hold a head count, updated after slicing: {path from block: kind}, kind in
    # {"heads", "kv_heads", "ffn"}.
    module_count_attrs: dict[str, str] = field(default_factory=dict)
    # Config fields: query heads, KV heads (None: MHA, same as heads), FFN width.
    config_heads: str = "num_attention_heads"
    config_kv_heads: str | None = "num_key_value_heads"
    config_ffn: str = "intermediate_size"
    # Whether a uniform head count can be written to the stock config. Needs an explicit ``head_dim`` field;
    # OPT derives head_dim from hidden_size // heads, so a removed head cannot be expressed there.
    config_has_head_dim: bool = True
    # Config fields that switch on the biases of every linear of a block part, {"attention": field, "mlp": field}:
    # what a method that gives the consumers an output bias (FLAP's compensation) sets. A part whose consumer
    # already has a bias needs none; a family without the field cannot take such a method.
    bias_switches: dict[str, str] = field(default_factory=dict)
    # Modules from the *ForCausalLM model that turn the last block's output into logits, in order (final norm,
    # projections, LM head); a path whose module is absent or None in a given model is skipped.
    final_modules: tuple[str, ...] = ("lm_head",)

    # -- shapes read from a config --------------------------------------------------------------------
    def num_heads(self, config: Any) -> int:
        return int(getattr(config, self.config_heads))

    def num_kv_heads(self, config: Any) -> int:
        if self.config_kv_heads is None:
            return self.num_heads(config)
        value = getattr(config, self.config_kv_heads, None)
        return self.num_heads(config) if value is None else int(value)

    def head_dim(self, config: Any) -> int:
        explicit = getattr(config, "head_dim", None) if self.config_has_head_dim else None
        return int(explicit) if explicit else int(config.hidden_size) // self.num_heads(config)

    def ffn_dim(self, config: Any) -> int:
        return int(getattr(config, self.config_ffn))

    def group_geometry(self, config: Any) -> tuple[int, int, int]:
        """(number of attention structures m, query heads per structure n_rep, head_dim)."""
        heads, kv = self.num_heads(config), self.num_kv_heads(config)
        if kv <= 0 or heads % kv != 0:
            raise ValueError(f"{self.config_heads}={heads} is not a multiple of the KV head count {kv}")
        return kv, heads // kv, self.head_dim(config)
