"""osscar_hf: one-shot structured pruning (OSSCAR) of Hugging Face Transformers language models.

    from osscar_hf import OsscarConfig, OsscarPruner
    pruned = OsscarPruner(OsscarConfig(attention_sparsity=0.25, mlp_sparsity=0.5, dataset=texts)).prune(model, tok)

Public names are imported lazily so that ``import osscar_hf`` stays cheap. Importing the package also
registers the ``"osscar"`` quantization method with transformers (see :mod:`osscar_hf.integrations`), so
``AutoModelForCausalLM.from_pretrained`` loads pruned checkpoints whose blocks have per-block shapes.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "OsscarConfig": "osscar_hf.config",
    "OsscarPruner": "osscar_hf.pruner",
    "PruneReport": "osscar_hf.report",
    "magnitude_prune": "osscar_hf.baselines",
    "evaluate_perplexity": "osscar_hf.evaluation",
    "measure_throughput": "osscar_hf.evaluation",
    "count_parameters": "osscar_hf.evaluation",
    "fetch_smollm2": "osscar_hf.demo.models",
    "OsscarError": "osscar_hf.errors",
    "OsscarConfigError": "osscar_hf.errors",
    "UnsupportedModelError": "osscar_hf.errors",
    "CalibrationDataError": "osscar_hf.errors",
    "SolverError": "osscar_hf.errors",
    "SurgeryError": "osscar_hf.errors",
    "ModelFetchError": "osscar_hf.errors",
    "save_pruned": "osscar_hf.io.save",
    "build_model_card": "osscar_hf.card",
    "push_pruned": "osscar_hf.hub",
    "pruning_record": "osscar_hf.io.save",
    "SaveError": "osscar_hf.io.save",
    "CheckpointError": "osscar_hf.streaming",
    "ResumeError": "osscar_hf.streaming",
    "ConcurrentRunError": "osscar_hf.streaming",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'osscar_hf' has no attribute {name!r}")


def _install_transformers_integration() -> None:
    from .integrations import install

    install()


_install_transformers_integration()
