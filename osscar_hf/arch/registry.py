"""The architecture registry: ``model_type`` -> :class:`ArchSpec`."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import UnsupportedModelError
from .experts import Experts, SharedExpert
from .spec import ArchSpec, Producer
from .vision import vision_model_types

OPT = ArchSpec(
    name="opt",
    model_types=("opt",),
    blocks="model.decoder.layers",
    attention="self_attn",
    q_proj="q_proj",
    k_proj="k_proj",
    v_proj="v_proj",
    o_proj="out_proj",
    mlp_producers=("fc1",),
    mlp_consumer="fc2",
    module_count_attrs={"self_attn.num_heads": "heads"},
    config_kv_heads=None,
    config_ffn="ffn_dim",
    config_has_head_dim=False,
    final_modules=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
)

LLAMA_FAMILY = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks="model.layers",
    attention="self_attn",
    q_proj="q_proj",
    k_proj="k_proj",
    v_proj="v_proj",
    o_proj="o_proj",
    mlp_producers=("mlp.gate_proj", "mlp.up_proj"),
    mlp_consumer="mlp.down_proj",
    module_count_attrs={"mlp.intermediate_size": "ffn", "self_attn.num_key_value_groups": "n_rep"},
    bias_switches={"attention": "attention_bias", "mlp": "mlp_bias"},
    final_modules=("model.norm", "lm_head"),
)

# Gemma, Gemma 2 and Gemma 3 (text): the Llama block layout (the extra norms around the attention and the MLP, the
# q/k norms over head_dim, soft-capped attention and sliding windows change no shape a KV group or a neuron
# takes), and Gemma 2's soft cap of the logits, which the global allocation's loss must apply too.
GEMMA_FAMILY = dataclasses.replace(
    LLAMA_FAMILY,
    name="gemma",
    model_types=("gemma", "gemma2", "gemma3_text"),
    config_final_logit_softcap="final_logit_softcapping",
)

# Gemma 3 with its vision tower (``model_type`` ``gemma3``, ``Gemma3ForConditionalGeneration``): the language model's
# blocks are Gemma 3 text blocks under ``model.language_model``, their fields in ``config.text_config``. Only the
# decoder is pruned; the vision tower and the projector are kept as they are. Checkpoints keep the names of the
# original release (``language_model.model.layers...``), which transformers renames on load for its stock class.
GEMMA3_MULTIMODAL = dataclasses.replace(
    GEMMA_FAMILY,
    name="gemma3",
    model_types=("gemma3",),
    blocks="model.language_model.layers",
    final_modules=("model.language_model.norm", "lm_head"),
    config_path="text_config",
    checkpoint_renames={"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
                        "vision_tower.": "model.vision_tower.",
                        "multi_modal_projector.": "model.multi_modal_projector."},
)

# Phi-3 (and Phi-3.5-mini, Phi-4-mini): fused projections. ``qkv_proj``'s rows are [q heads | k heads | v heads],
# ``gate_up_proj``'s [gate | up]. The attention reads the query head count from the config it shares with every block
# (``self.config.num_attention_heads``), which a pruned block overrides in a view of its own. Phi3Config has no
# ``head_dim`` field and its rope validation derives the rotary width from ``hidden_size // num_attention_heads``
# (longrope factors would no longer match), so a head count stays out of the stock config: pruned heads travel in
# the osscar or remote-code format, a pruned FFN alone in a stock config.
PHI3 = ArchSpec(
    name="phi3",
    model_types=("phi3",),
    blocks="model.layers",
    attention="self_attn",
    attention_producers=(Producer("qkv_proj", ("q", "k", "v")),),
    o_proj="o_proj",
    mlp_producers=(Producer("mlp.gate_up_proj", ("neurons", "neurons")),),
    mlp_consumer="mlp.down_proj",
    module_count_attrs={"self_attn.num_key_value_heads": "kv_heads", "self_attn.config.num_attention_heads": "heads",
                        "self_attn.num_key_value_groups": "n_rep"},
    config_has_head_dim=False,
    final_modules=("model.norm", "lm_head"),
)

# GPT-NeoX (Pythia): ``query_key_value``'s rows are per head [q | k | v] (interleaved), consumed by ``dense``; the
# attention derives its head count from the weights and its head size from ``hidden_size // num_attention_heads``
# (no count attribute, no ``head_dim`` field: pruned heads travel in the osscar or remote-code format). The MLP's
# linears always have biases, the attention's when ``attention_bias`` (the switch FLAP's compensation sets).
# Checkpoints name the LM head ``embed_out`` (the model's ``lm_head``), which the streamed run and the remote-code
# class rename (``checkpoint_renames``).
GPT_NEOX = ArchSpec(
    name="gpt_neox",
    model_types=("gpt_neox",),
    blocks="gpt_neox.layers",
    attention="attention",
    attention_producers=(Producer("query_key_value", ("q", "k", "v"), interleaved=True),),
    o_proj="dense",
    mlp_producers=("mlp.dense_h_to_4h",),
    mlp_consumer="mlp.dense_4h_to_h",
    config_kv_heads=None,
    config_has_head_dim=False,
    bias_switches={"attention": "attention_bias"},
    final_modules=("gpt_neox.final_layer_norm", "lm_head"),
    checkpoint_renames={"embed_out.": "lm_head."},
)

# Mixture of experts (transformers 5: the experts of a block are one module of 3-D tensors, ``gate_up_proj`` with each
# expert's rows [gate | up] and ``down_proj``): Mixtral and Qwen3-MoE (every layer sparse: ``mlp_only_layers`` empty
# and ``decoder_sparse_step`` 1, as in the published checkpoints; no shared expert). The attention is the Llama layout
# (Qwen3-MoE's q/k norms act per head). Checkpoints store each expert's linears apart, which a streamed run reads and
# writes under those names. (OLMoE, below, has the same experts, but its q/k norms span the whole projection.)
MIXTRAL = dataclasses.replace(
    LLAMA_FAMILY,
    name="mixtral",
    model_types=("mixtral",),
    mlp_producers=(Producer("mlp.experts.gate_up_proj", ("neurons", "neurons")),),
    mlp_consumer="mlp.experts.down_proj",
    module_count_attrs={"mlp.experts.intermediate_dim": "ffn", "self_attn.num_key_value_groups": "n_rep"},
    bias_switches={},
    experts=Experts(checkpoint_module="block_sparse_moe.experts",
                    checkpoint_names={"gate_up_proj": ("{e}.w1.weight", "{e}.w3.weight"),
                                      "down_proj": ("{e}.w2.weight",)}),
)
QWEN3_MOE = dataclasses.replace(
    MIXTRAL,
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    config_ffn="moe_intermediate_size",
    experts=Experts(config_count="num_experts", config_sparse_layers={"mlp_only_layers": [], "decoder_sparse_step": 1},
                    checkpoint_names={"gate_up_proj": ("{e}.gate_proj.weight", "{e}.up_proj.weight"),
                                      "down_proj": ("{e}.down_proj.weight",)}),
)

# Qwen1.5/2-MoE: Qwen3-MoE's experts (without q/k norms; q/k/v biases) plus a shared expert, a dense MLP every token
# goes through, scaled by sigmoid(shared_expert_gate(x)).
QWEN2_MOE = dataclasses.replace(
    QWEN3_MOE,
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    experts=dataclasses.replace(QWEN3_MOE.experts, shared=SharedExpert()),
)

# OLMoE: Qwen3-MoE's experts and checkpoint names (every layer sparse, no shared expert), but q/k norms over the whole
# projection: only its MLP is pruned.
OLMOE = dataclasses.replace(
    QWEN3_MOE,
    name="olmoe",
    model_types=("olmoe",),
    config_ffn="intermediate_size",
    experts=dataclasses.replace(QWEN3_MOE.experts, config_sparse_layers=None),
    attention_fixed="its q/k norms normalise the whole query and key projections, not each head, so removing a head "
                    "changes every other head's output",
)

_REGISTRY: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec, *, overwrite: bool = False) -> None:
    """Add ``spec`` for each of its model types (a clear error if one is taken, unless ``overwrite``, or if the
    spec is malformed: :meth:`ArchSpec.problems`). Nothing is registered when it raises. Whether the spec fits a
    given model is checked when that model is pruned (:meth:`ArchSpec.check_model`)."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"register_architecture needs an ArchSpec, got {type(spec).__name__}")
    problems = spec.problems()
    if problems:
        raise ValueError(f"architecture spec {spec.name!r} is malformed: {'; '.join(problems)}")
    for model_type in spec.model_types:
        if model_type in _REGISTRY and not overwrite:
            raise ValueError(f"model_type {model_type!r} is already registered (spec {_REGISTRY[model_type].name!r})")
    for model_type in spec.model_types:
        _REGISTRY[model_type] = spec


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(model_or_config: Any) -> ArchSpec:
    """The spec for a model (or its config), by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY and getattr(config, "osscar_base_model_type", None) is not None:
        raise UnsupportedModelError(
            f"this model (model_type {model_type!r}) was already pruned by osscar_hf and saved in the remote-code "
            "format; prune the dense model instead"
        )
    if model_type in vision_model_types():
        raise UnsupportedModelError(
            f"model_type {model_type!r} is a CNN: osscar_hf prunes it in memory with OsscarPruner(OsscarConfig("
            "channel_sparsity=... or sparsity=...)).prune(model, image_processor) (the command line: a local folder "
            "of the model, or --channel-sparsity); streamed pruning, the remote-code format and the other "
            "language-model paths do not take CNNs yet (docs/vision.md)"
        )
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"osscar_hf does not support model_type {model_type!r} (CNNs pruned by channel_sparsity: "
            f"{', '.join(vision_model_types())}); supported model types: {', '.join(supported_model_types())}"
        )
    return _REGISTRY[model_type]


register_architecture(OPT)
register_architecture(LLAMA_FAMILY)
register_architecture(GEMMA_FAMILY)
register_architecture(GEMMA3_MULTIMODAL)
register_architecture(PHI3)
register_architecture(GPT_NEOX)
register_architecture(MIXTRAL)
register_architecture(QWEN3_MOE)
register_architecture(QWEN2_MOE)
register_architecture(OLMOE)
