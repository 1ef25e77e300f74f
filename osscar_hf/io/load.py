"""Loading a causal LM (dense, or pruned by osscar_hf) and its tokenizer, and reading the ``dtype``/``device``
options that the command line, the perplexity metric and streaming accept.

    from osscar_hf.io.load import load_model_and_tokenizer
    model, tokenizer = load_model_and_tokenizer("path/or/id", dtype="bfloat16", device="auto")
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["DTYPE_NAMES", "load_model_and_tokenizer", "resolve_device", "resolve_dtype"]

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


def resolve_dtype(dtype: Any) -> Any:
    """``None``/``"auto"`` -> ``"auto"`` (the checkpoint's dtype); a name or ``torch.dtype`` -> ``torch.dtype``.

    Raises ``ValueError`` naming the accepted values.
    """
    import torch

    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype.strip().lower(), dtype.strip().lower())
        if name == "auto":
            return "auto"
        if name in DTYPE_NAMES:
            return getattr(torch, name)
    raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)} (or a torch.dtype), got {dtype!r}")


def resolve_device(device: Any) -> Any:
    """``None``/``"auto"`` -> CUDA when available, else CPU; otherwise a ``torch.device``.

    Raises ``ValueError`` for an unknown device or CUDA requested where there is none.
    """
    import torch

    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str) and device.strip().lower() == "gpu":
        device = "cuda"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available here; use 'cpu' or 'auto'")
    return resolved


def load_model_and_tokenizer(
    model_id: str | Path,
    *,
    dtype: Any = "float32",
    device: Any = None,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a causal LM (dense, or pruned by osscar_hf) and its tokenizer for evaluation.

    Args:
        model_id: a local folder or a Hub model id.
        dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
        device: where to put the model; ``None``/``"auto"`` is CUDA when available, else CPU.
        tokenizer: a tokenizer object, a folder / id to load one from, or ``None`` for ``model_id``'s own.
        trust_remote_code: run the modeling code shipped with the checkpoint (needed for checkpoints saved in
            osscar_hf's ``remote_code`` format, or any other custom-code model); off by default.

    Returns:
        ``(model, tokenizer)``, the model in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Importing osscar_hf (done by importing this module) registered the "osscar" quantization method with
    # transformers, so pruned checkpoints with per-block shapes load here too.
    torch_dtype = resolve_dtype(dtype)
    run_device = resolve_device(device)
    source = str(model_id)
    logger.info("Loading %s (dtype %s) on %s", source, torch_dtype, run_device)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.to(run_device)
    model.eval()
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer or source), trust_remote_code=trust_remote_code)
    return model, tokenizer


def load_image_model(model_id: str | Path, *, dtype: Any = "float32", device: Any = None) -> tuple[Any, Any]:
    """Load an image classifier (dense, or pruned by osscar_hf) and its image processor; the model in eval mode on
    ``device`` (``None``/``"auto"``: CUDA when available, else CPU)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    source = str(model_id)
    model = AutoModelForImageClassification.from_pretrained(source, dtype=resolve_dtype(dtype))
    model.to(resolve_device(device))
    model.eval()
    return model, AutoImageProcessor.from_pretrained(source)
