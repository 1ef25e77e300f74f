"""Architecture support as data: one :class:`ArchSpec` per family, looked up by ``model_type``."""

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

__all__ = [
    "ATTENTION_STRUCTURES",
    "ArchSpec",
    "AttentionLayout",
    "GEMMA3_MULTIMODAL",
    "GEMMA_FAMILY",
    "GPT_NEOX",
    "LLAMA_FAMILY",
    "OPT",
    "PHI3",
    "Producer",
    "attention_layout",
    "get_spec",
    "get_submodule",
    "register_architecture",
    "set_submodule",
    "supported_model_types",
]
