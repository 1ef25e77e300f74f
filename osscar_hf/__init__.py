"""osscar_hf: one-shot structured pruning (OSSCAR) of Hugging Face Transformers language models.

    from osscar_hf import OsscarConfig, OsscarPruner
    pruned = OsscarPruner(OsscarConfig(attention_sparsity=0.25, mlp_sparsity=0.5, dataset=texts)).prune(model, tok)

Public names are imported lazily so that ``import osscar_hf`` stays cheap; the error classes (all defined in
:mod:`osscar_hf.errors`, which imports nothing) are here at once. Importing the package also
registers the ``"osscar"`` quantization method with transformers (see :mod:`osscar_hf.integrations`), so
``AutoModelForCausalLM.from_pretrained`` loads pruned checkpoints whose blocks have per-block shapes.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import *  # noqa: F403 - the whole error hierarchy (osscar_hf.errors imports nothing)
from .errors import __all__ as _ERROR_NAMES
from .version import __version__

_LAZY = {
    "OsscarConfig": "osscar_hf.config",
    "OsscarPruner": "osscar_hf.pruner",
    "PruneReport": "osscar_hf.report",
    "magnitude_prune": "osscar_hf.baselines",
    "evaluate_perplexity": "osscar_hf.evaluation",
    "measure_throughput": "osscar_hf.evaluation",
    "count_parameters": "osscar_hf.evaluation",
    "fetch_smollm2": "osscar_hf.demo.models",
    "save_pruned": "osscar_hf.io.save",
    "build_model_card": "osscar_hf.card",
    "push_pruned": "osscar_hf.hub",
    "pruning_record": "osscar_hf.io.save",
    "export_gguf": "osscar_hf.export.gguf",
}

__all__ = ["__version__", *_ERROR_NAMES, *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'osscar_hf' has no attribute {name!r}")


def _install_transformers_integration() -> None:
    from .integrations import install

    install()


_install_transformers_integration()
