"""Pruning methods, registered by name: ``OsscarConfig(method=...)`` picks one.

Every method runs in the same pipeline (same calibration windows, same block loop, same shapes), so their
results compare fairly. Adding one is one module: subclass :class:`PruningMethod` (which statistics it needs,
how it selects, whether it refits or adds a bias) and call :func:`register_method`.

========================  ===================================================================================
``"osscar"`` (default)    combinatorial selection on the Gram matrix (stage A + local search), ridge refit
``"obs_greedy"``          exact greedy OBS elimination (step 1, no local search), ridge refit (ZipLM-style)
``"magnitude"``           L2 norm of each structure's consumer columns, no calibration, no refit
``"wanda_sp"``            structured Wanda: |W| x input activation norm, no refit
``"flap"``                FLAP: input fluctuation x squared column norm, bias compensation, its own allocation
========================  ===================================================================================
"""

from __future__ import annotations

from ..errors import OsscarConfigError
from .base import GRAM, MOMENTS, LayerProblem, LayerStatistics, PruningMethod, Selection, SolveSettings
from .osscar import ObsGreedy, Osscar
from .scores import Flap, Magnitude, WandaSP

__all__ = [
    "GRAM", "MOMENTS", "LayerProblem", "LayerStatistics", "PruningMethod", "Selection", "SolveSettings",
    "describe_method", "get_method", "method_names", "register_method",
]

_METHODS: dict[str, type[PruningMethod]] = {}


def register_method(method: type[PruningMethod], *, overwrite: bool = False) -> type[PruningMethod]:
    """Make ``method`` available as ``OsscarConfig(method=method.name)`` (a clear error if the name is taken)."""
    if not (isinstance(method, type) and issubclass(method, PruningMethod)):
        raise TypeError(f"register_method needs a PruningMethod subclass, got {method!r}")
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{method.__name__} must set a non-empty class attribute `name`")
    if name in _METHODS and not overwrite and _METHODS[name] is not method:
        raise ValueError(f"pruning method {name!r} is already registered ({_METHODS[name].__name__})")
    _METHODS[name] = method
    return method


def method_names() -> list[str]:
    """The registered method names, in registration order."""
    return list(_METHODS)


def get_method(name: str) -> PruningMethod:
    """A fresh instance of the method registered as ``name``."""
    if name not in _METHODS:
        raise OsscarConfigError(f"method must be one of {method_names()}, got {name!r}")
    return _METHODS[name]()


def describe_method(name: str) -> str:
    """One line on the method registered as ``name``; a method registered by code not imported here (a model
    pruned with a user's own method, read elsewhere) is described as such, not refused."""
    if name in _METHODS:
        return _METHODS[name].description
    return f"a method registered as {name!r} by the code that pruned this model (not registered here)"


for _method in (Osscar, ObsGreedy, Magnitude, WandaSP, Flap):
    register_method(_method)
