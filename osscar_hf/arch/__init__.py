"""Architecture support as data: one :class:`ArchSpec` per family, looked up by ``model_type`` (a CNN: one
:class:`VisionSpec`, see :mod:`.vision`)."""

from .attention import ATTENTION_STRUCTURES, AttentionLayout, attention_layout
from .registry import (
    GEMMA3_MULTIMODAL,
    GEMMA_FAMILY,
    GPT_NEOX,
    LLAMA_FAMILY,
    OPT,
    PHI3,
    get_spec,
    register_architecture,
    supported_model_types,
)
from .spec import ArchSpec, Producer, get_submodule, set_submodule
from . import timm_vision  # noqa: F401  (registers the timm CNN specs)
from .vision import ChannelProblem, VisionSpec, get_vision_spec, register_vision_architecture, vision_model_types

__all__ = [
    "ATTENTION_STRUCTURES",
    "ArchSpec",
    "AttentionLayout",
    "ChannelProblem",
    "GEMMA3_MULTIMODAL",
    "GEMMA_FAMILY",
    "GPT_NEOX",
    "LLAMA_FAMILY",
    "OPT",
    "PHI3",
    "Producer",
    "VisionSpec",
    "attention_layout",
    "get_spec",
    "get_vision_spec",
    "get_submodule",
    "register_architecture",
    "register_vision_architecture",
    "set_submodule",
    "supported_model_types",
    "vision_model_types",
]
