"""The osscar_hf error hierarchy.

Every error also subclasses the matching built-in, so callers may catch either ``OsscarError`` or the
usual ``ValueError``/``RuntimeError``.
"""

from __future__ import annotations


class OsscarError(Exception):
    """Base class of every error raised by osscar_hf."""


class OsscarConfigError(OsscarError, ValueError):
    """An ``OsscarConfig`` field has a value outside its accepted range, or an unknown key was given."""


class UnsupportedModelError(OsscarError, ValueError):
    """The model's architecture has no spec in the registry."""


class CalibrationDataError(OsscarError, ValueError):
    """The calibration data cannot be loaded or is too small for the requested windows."""


class SolverError(OsscarError, RuntimeError):
    """The layer-wise problem could not be solved (for example a Gram matrix that stays singular)."""


class SurgeryError(OsscarError, ValueError):
    """Structures to keep are invalid for the module being resized."""


class ModelFetchError(OsscarError, RuntimeError):
    """A model could not be downloaded or converted (network, checksum, missing dependency)."""
