"""Plugging osscar_hf into transformers: the ``"osscar"`` quantization method.

``import osscar_hf`` calls :func:`install`, which registers :class:`~osscar_hf.config.OsscarConfig` and
:class:`~osscar_hf.integrations.quantizer.OsscarHfQuantizer` under ``quant_method="osscar"`` so that
``AutoModelForCausalLM.from_pretrained`` loads pruned checkpoints whose blocks have per-block shapes.

Importing ``transformers.quantizers`` costs about two seconds (it imports every quantizer transformers
ships), so :func:`install` does not import it: when transformers has already imported it, the method is
registered at once; otherwise a post-import hook registers it right after transformers imports
``transformers.quantizers.auto`` (which ``from_pretrained`` always does first). :func:`register` does it
eagerly. Both are idempotent.

This module imports nothing heavy.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import threading
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["install", "is_registered", "register"]

_TARGET = "transformers.quantizers.auto"
_LOCK = threading.RLock()


def register() -> None:
    """Register the ``"osscar"`` quantization config and quantizer with transformers (idempotent).

    Imports ``transformers.quantizers`` if needed. Raises ``OsscarError`` when another package registered a
    different class under ``"osscar"``. The registration itself is
    :func:`osscar_hf.integrations.quantizer.register_quantizer`, which also runs when that module is first imported.
    """
    quantizer_module = sys.modules.get(f"{__name__}.quantizer")
    if quantizer_module is not None and not hasattr(quantizer_module, "register_quantizer"):
        # Importing our quantizer module made transformers import its registry (and fired the hook): the
        # module is half-run here, and registers itself when it finishes.
        return
    from .quantizer import register_quantizer

    register_quantizer()


def is_registered() -> bool:
    """Whether transformers (already imported) knows the ``"osscar"`` method; never imports transformers."""
    auto = sys.modules.get(_TARGET)
    if auto is None:
        return False
    from ..config import QUANT_METHOD

    return QUANT_METHOD in getattr(auto, "AUTO_QUANTIZATION_CONFIG_MAPPING", {}) and QUANT_METHOD in getattr(
        auto, "AUTO_QUANTIZER_MAPPING", {}
    )


def install() -> None:
    """Register now if transformers' quantizer registry is loaded, else when transformers loads it."""
    with _LOCK:
        if _TARGET in sys.modules:
            register()
            return
        if not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport())


def _register_from_hook() -> None:
    try:
        register()
    except Exception:  # never break `import transformers` for everyone: say why, let loading go on
        logger.exception(
            "osscar_hf could not register its 'osscar' quantization method with transformers; pruned "
            "checkpoints with per-block shapes will not load. Call osscar_hf.integrations.register() to see the error."
        )


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``transformers.quantizers.auto`` with the other finders and registers osscar once it has run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _LoaderThenRegister(spec.loader, self)
        return spec


class _LoaderThenRegister(importlib.abc.Loader):
    """Delegates to the real loader; after the module ran, removes the hook and registers osscar."""

    def __init__(self, loader: Any, finder: _RegisterAfterImport) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        with _LOCK:
            if self._finder in sys.meta_path:
                sys.meta_path.remove(self._finder)
        _register_from_hook()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, ... for tracebacks
        return getattr(self._loader, name)
