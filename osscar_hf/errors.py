"""The osscar_hf error hierarchy: every exception the package raises to a caller is defined here.

Every error also subclasses the matching built-in, so callers may catch either ``OsscarError`` (or one of its
branches) or the usual ``ValueError``/``RuntimeError``/``OSError``::

    OsscarError(Exception)
    ├── OsscarConfigError(ValueError)         an OsscarConfig field out of range, an unknown key
    ├── UnsupportedModelError(ValueError)     no architecture spec for the model
    ├── CalibrationDataError(ValueError)      calibration data missing or too small
    ├── SolverError(RuntimeError)             a layer-wise problem that cannot be solved
    ├── SurgeryError(ValueError)              invalid structures to keep
    ├── ModelFetchError(RuntimeError)         the demo model cannot be downloaded or converted
    ├── ActivationStorageError(OSError)       calibration activations on disk cannot be written or read
    ├── NotDequantizableError(NotImplementedError)   model.dequantize() on a pruned model
    ├── SaveError(ValueError)                 a pruned model cannot be saved where or how asked
    │   └── OutputConflictError               the output folder changed under the writer
    ├── RemoteCodeError(ValueError)           the remote-code format cannot hold the model
    ├── CardError(ValueError)                 inconsistent model-card inputs
    ├── HubPushError(RuntimeError)            a push to the Hub failed
    │   ├── HubAuthenticationError            no token, or a rejected one
    │   ├── HubPermissionError(PermissionError)   the token may not write there
    │   └── HubConnectionError(ConnectionError)   the Hub cannot be reached
    ├── CheckpointError(ValueError)           a checkpoint cannot be streamed
    ├── ResumeError(ValueError)               an interrupted streamed run cannot be resumed as asked
    ├── ConcurrentRunError(RuntimeError)      another run holds the output folder's lock
    ├── RankFailedError(RuntimeError)         another rank of a distributed run failed (its error is named)
    ├── CommandError(ValueError)              the command line was asked for something impossible
    └── GGUFExportError(ValueError)           a model cannot be written as a GGUF file for llama.cpp (or not as asked)

The modules that raise these also re-export them under their old names (``osscar_hf.hub.HubPushError``,
``osscar_hf.io.save.SaveError``, ``osscar_hf.streaming.CheckpointError``...), and ``osscar_hf`` exports them all.
This module imports nothing, so any module may import it.
"""

from __future__ import annotations

__all__ = [
    "ActivationStorageError", "CalibrationDataError", "CardError", "CheckpointError", "CommandError",
    "ConcurrentRunError", "GGUFExportError", "HubAuthenticationError", "HubConnectionError", "HubPermissionError",
    "HubPushError", "ModelFetchError", "NotDequantizableError", "OsscarConfigError", "OsscarError", "OutputConflictError",
    "RankFailedError", "RemoteCodeError", "ResumeError", "SaveError", "SolverError", "SurgeryError", "UnsupportedModelError",
]


class OsscarError(Exception):
    """Base class of every error raised by osscar_hf."""


# --------------------------------------------------------------------------- settings, models, the pruning itself
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


class ActivationStorageError(OsscarError, OSError):
    """Calibration activations cannot be written to or read back from their folder on disk."""


class NotDequantizableError(OsscarError, NotImplementedError):
    """``model.dequantize()`` on an osscar-pruned model: there is nothing to dequantize."""


# --------------------------------------------------------------------------- saving, cards and the Hub
class SaveError(OsscarError, ValueError):
    """A pruned model cannot be saved where or how it was asked to be."""


class OutputConflictError(SaveError):
    """The output folder was created or filled by someone else while the checkpoint was being written."""


class RemoteCodeError(OsscarError, ValueError):
    """A model cannot be written in (or converted from) the remote-code format."""


class CardError(OsscarError, ValueError):
    """The inputs of a model card are inconsistent or malformed (for example bad ``eval_results``)."""


class HubPushError(OsscarError, RuntimeError):
    """A pruned model could not be pushed to the Hub."""


class HubAuthenticationError(HubPushError):
    """No Hugging Face token was found, or the Hub rejected it."""


class HubPermissionError(HubPushError, PermissionError):
    """The token may not write to the repository (another user's or organisation's, or a read-only token)."""


class HubConnectionError(HubPushError, ConnectionError):
    """The Hub could not be reached (network down, wrong ``HF_ENDPOINT``, offline mode)."""


# --------------------------------------------------------------------------- streaming a checkpoint
class CheckpointError(OsscarError, ValueError):
    """A checkpoint cannot be streamed: neither a local folder nor a Hub id, no safetensors weights, a missing,
    corrupt or inconsistent shard (the message names the file), or a Hub repository that is unknown, gated or
    unreachable (the message names it and says what to do)."""


class ResumeError(OsscarError, ValueError):
    """An interrupted streaming run left a partial folder, but with different settings or source."""


class ConcurrentRunError(OsscarError, RuntimeError):
    """Another ``prune_checkpoint`` run is writing to the same output folder (it holds the folder's lock)."""


class RankFailedError(OsscarError, RuntimeError):
    """Another process of a distributed run (``torch.distributed``) failed: this one stops too. The message names
    the failed rank and its error."""


# --------------------------------------------------------------------------- the command line
class CommandError(OsscarError, ValueError):
    """A problem with what the user asked for, found by a command handler: printed as one line, exit 1."""


# --------------------------------------------------------------------------- exporting to other runtimes
class GGUFExportError(OsscarError, ValueError):
    """A model cannot be written as a GGUF file for llama.cpp: an unsupported family, dtype, tokenizer or shape that
    llama.cpp cannot express, or an output path that exists or cannot be written (the message names the value and
    what is accepted)."""
