"""Gemma, Gemma 2 and Gemma 3 text models in llama.cpp's ``gemma``, ``gemma2`` and ``gemma3`` architectures.

Facts about llama.cpp this module relies on (llama.cpp vendored by llama-cpp-python 0.3.36, ``src/models/gemma*.cpp``):

- Every one scales the embedding by sqrt(hidden), applies Gemma's GELU (tanh), and holds one head count, KV-head count
  and FFN width for every layer (uniform shapes only). Gemma's RMSNorm scales by ``1 + weight``: the norms are written
  with 1 added (:data:`osscar_hf.export.gguf_tensors.NORM_SHIFT`), as llama.cpp's converter does.
- Queries are scaled by 1/sqrt(head_dim), except in the 27B models (``gemma2`` with 46 layers, ``gemma3`` with 62),
  where it is 1/sqrt(hidden / heads of layer 0); transformers scales by ``query_pre_attn_scalar ** -0.5``. A model
  whose two scales differ for the written shapes is refused.
- ``gemma`` and ``gemma2`` always compute the logits with the embedding (tied head); ``gemma2`` always soft-caps the
  attention scores and the logits (its defaults, 50 and 30, when the file has no value), ``gemma3`` caps only the
  logits, when the file says so, and ``gemma`` neither.
- ``gemma2`` and ``gemma3`` read which layers attend through a sliding window as a per-layer pattern (written
  explicitly from the config's ``layer_types``) and the window; ``gemma3`` gives those layers their own rope base
  (``rope.freq_base_swa``) and applies rope scaling to the full-attention layers only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import GGUFExportError
from .gguf_layout import Layout

__all__ = ["GEMMA_ARCHS", "check_gemma", "gemma_rope_parameters", "write_gemma_keys"]


@dataclass(frozen=True)
class _Rules:
    """What one of llama.cpp's Gemma architectures computes. Soft caps: ``"none"`` (never applied: the model must
    have none), ``"required"`` (always applied: the model must have one), ``"optional"``."""

    activation_field: str
    attention_cap: str
    logit_cap: str
    layers_of_27b: int | None
    sliding: bool
    tied_only: bool


_RULES = {
    "gemma": _Rules("hidden_act", "none", "none", None, False, True),
    "gemma2": _Rules("hidden_activation", "required", "required", 46, True, True),
    "gemma3": _Rules("hidden_activation", "none", "optional", 62, True, False),
}
GEMMA_ARCHS = tuple(_RULES)
_CAPS = {"attention": "attn_logit_softcapping", "logit": "final_logit_softcapping"}


def gemma_rope_parameters(config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the full-attention layers' rope parameters, the sliding-window layers'): Gemma 3 has one of each
    (``rope_parameters`` keyed by layer type), the others one rope for all."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params or "sliding_attention" in params:
        return dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    return params, params


def _cap_problems(rules: _Rules, config: Any, arch: str) -> list[str]:
    problems = []
    for name, rule in (("attention", rules.attention_cap), ("logit", rules.logit_cap)):
        value = getattr(config, _CAPS[name], None)
        if rule == "none" and value is not None:
            problems.append(f"{_CAPS[name]}={value} (llama.cpp's {arch} has no {name} soft cap)")
        elif rule == "required" and not value:
            problems.append(f"no {_CAPS[name]} (llama.cpp's {arch} always applies one)")
    return problems


def check_gemma(arch: str, config: Any, layout: Layout, head_dim: int, tied: bool) -> None:
    """Refuse what llama.cpp's Gemma architecture ``arch`` computes otherwise than transformers: another activation,
    soft caps it does not apply (or lacks), an untied head where it always uses the embedding, bidirectional
    attention, another rope on the sliding layers, and another query scale for the written shapes."""
    rules = _RULES[arch]
    problems = _cap_problems(rules, config, arch)
    activation = getattr(config, rules.activation_field, None)
    if activation != "gelu_pytorch_tanh":
        problems.append(f"{rules.activation_field}={activation!r} (llama.cpp applies gelu_pytorch_tanh)")
    if rules.tied_only and not tied:
        problems.append(f"an LM head of its own (llama.cpp's {arch} computes the logits with the embedding)")
    if getattr(config, "use_bidirectional_attention", False):
        problems.append("bidirectional attention")
    full, sliding = gemma_rope_parameters(config)
    if rules.sliding and sliding is not full and sliding.get("rope_type", "default") != "default":
        problems.append(f"rope type {sliding['rope_type']!r} on the sliding-window layers (llama.cpp: default only)")
    scale_dim = config.hidden_size / layout.layers[0].heads if len(layout.layers) == rules.layers_of_27b else head_dim
    wanted = float(getattr(config, "query_pre_attn_scalar", None) or head_dim)
    if not math.isclose(wanted, scale_dim, rel_tol=1e-6):
        problems.append(f"query_pre_attn_scalar={wanted:g} where llama.cpp scales queries by 1/sqrt({scale_dim:g}) "
                        "for these shapes")
    if problems:
        raise GGUFExportError(f"this model cannot be written for llama.cpp's {arch} architecture: " + "; ".join(problems))


def write_gemma_keys(writer: Any, arch: str, config: Any) -> None:
    """The keys of ``arch`` beyond those of every architecture: the sliding-window pattern, window and rope base,
    and the soft caps."""
    rules = _RULES[arch]
    layer_types = list(getattr(config, "layer_types", None) or [])
    if rules.sliding and getattr(config, "sliding_window", None) and "sliding_attention" in layer_types:
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])
        full, sliding = gemma_rope_parameters(config)
        writer.add_rope_freq_base_swa(float(sliding.get("rope_theta", full.get("rope_theta", 10000.0))))
    if rules.attention_cap != "none":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if rules.logit_cap != "none" and getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
