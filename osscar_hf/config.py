"""``OsscarConfig``: the validated, serialisable settings of one OSSCAR pruning run.

The class plugs into transformers as a quantization config (it subclasses ``QuantizationConfigMixin``,
in the style of ``GPTQConfig``), so a pruned checkpoint's ``config.json`` carries it under
``quantization_config`` with ``"quant_method": "osscar"``.

Every field is checked in ``__post_init__`` (and again by :meth:`OsscarConfig.post_init`, which the
pipeline may call after attributes were changed by hand): a bad value raises ``OsscarConfigError`` whose
message names the field, the value and what is accepted.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import sys
import tempfile
from dataclasses import KW_ONLY, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from osscar_hf.arch.attention import ATTENTION_STRUCTURES
from osscar_hf.errors import OsscarConfigError
from osscar_hf.version import __version__

if TYPE_CHECKING:  # pragma: no cover
    import datasets

logger = logging.getLogger(__name__)

__all__ = ["OsscarConfig", "describe_dataset", "keep_count", "library_versions"]

QUANT_METHOD = "osscar"
# The keys of one entry of ``OsscarConfig.block_shapes`` (one decoder block's structure counts).
BLOCK_SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "ffn_dim")
# ... and the key a mixture of experts with a shared expert adds (its width).
SHARED_SHAPE_KEY = "shared_ffn_dim"
# The key of one entry of ``OsscarConfig.block_shapes`` for a CNN block: its inner widths, one per channel problem in
# the order they are solved (see :mod:`osscar_hf.arch.vision`).
CHANNEL_SHAPE_KEY = "channels"
# The keys of one entry of ``OsscarConfig.block_sizes`` (kept attention structures and neurons of one block).
BLOCK_SIZE_KEYS = ("attention", "mlp")
SPARSITY_TARGETS = ("params", "flops")
ALLOCATIONS = ("auto", "global", "uniform")
# Keys written by ``to_json_file`` next to the fields; accepted (and ignored) by ``from_dict``.
VERSION_KEYS = ("osscar_version", "transformers_version", "torch_version")

_SOLVER_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Accepted values of OsscarConfig.activation_storage (the same as osscar_hf.activations.STORAGE_MODES).
ACTIVATION_STORAGE_MODES = ("auto", "memory", "disk")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def keep_count(m: int, sparsity: float) -> int:
    """Number of structures (heads, KV groups, neurons) kept out of ``m`` at the given sparsity.

    Returns ``m - round(m * sparsity)`` with Python's ``round`` (round half to even: ``keep_count(5, 0.5)``
    removes ``round(2.5) == 2`` and keeps 3). The result may be 0 for small ``m`` (``keep_count(1, 0.6)``);
    callers that cannot remove a whole module must check for that.
    """
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0:
        raise OsscarConfigError(f"m must be a non-negative int, got {m!r}")
    sparsity = _check_fraction("sparsity", sparsity)
    return int(m) - round(int(m) * sparsity)


# --------------------------------------------------------------------------- field checks
def _check_fraction(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not 0.0 <= value < 1.0
    ):
        raise OsscarConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_unit_interval(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise OsscarConfigError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise OsscarConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_block_sizes(value: Any) -> list[dict[str, int]] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise OsscarConfigError(
            f"block_sizes must be None or a non-empty list with one dict per decoder block, got {_summarise(value)}")
    sizes = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or set(entry) != set(BLOCK_SIZE_KEYS):
            raise OsscarConfigError(
                f"block_sizes[{i}] must be a dict with exactly the keys {list(BLOCK_SIZE_KEYS)} (kept attention "
                f"structures and kept neurons), got {_summarise(entry)}")
        for key in BLOCK_SIZE_KEYS:
            count = entry[key]
            if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
                raise OsscarConfigError(f"block_sizes[{i}][{key!r}] must be an int >= 0, got {count!r}")
        sizes.append({key: int(entry[key]) for key in BLOCK_SIZE_KEYS})
    return sizes


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise OsscarConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise OsscarConfigError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def _is_pil_image(value: Any) -> bool:
    # Through sys.modules, as for datasets: a PIL image exists only where PIL was imported.
    mod = sys.modules.get("PIL.Image")
    return mod is not None and isinstance(value, mod.Image)


def _is_hf_dataset(value: Any) -> bool:
    # Checked through sys.modules so that validating a config never imports `datasets` (slow import).
    mod = sys.modules.get("datasets")
    return mod is not None and isinstance(value, mod.Dataset)


_DATASET_ACCEPTED = (
    "None, a str (a dataset name such as 'wikitext2', 'self' for text sampled from the model, or a path to a "
    ".txt/.jsonl/.parquet file), an "
    "os.PathLike path, a non-empty list of str, a non-empty list of non-empty lists of int token ids, a 2-D "
    "integer torch.Tensor of token ids, or a datasets.Dataset; for an image model: a non-empty list of PIL images, "
    "a folder of images, or a datasets.Dataset with an image column"
)


def _summarise(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_dataset(value: Any, text_column: str, image_column: str = "image") -> Any:
    if value is None or isinstance(value, str):
        if isinstance(value, str) and not value:
            raise OsscarConfigError(f"dataset must not be an empty str; accepted: {_DATASET_ACCEPTED}")
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor):
        if value.ndim != 2 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise OsscarConfigError(
                "dataset as a torch.Tensor must be a 2-D integer tensor of token ids (num_rows, seq_len), got "
                f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        if value.numel() == 0:
            raise OsscarConfigError(f"dataset tensor must not be empty, got shape {tuple(value.shape)}")
        return value
    if _is_hf_dataset(value):
        if text_column not in value.column_names and image_column not in value.column_names:
            raise OsscarConfigError(
                f"dataset (a datasets.Dataset) has no column text_column={text_column!r} (texts) nor "
                f"image_column={image_column!r} (images); its columns are {value.column_names}"
            )
        return value
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise OsscarConfigError(f"dataset must not be an empty list; accepted: {_DATASET_ACCEPTED}")
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(_is_pil_image(v) for v in value):
            return list(value)
        if all(isinstance(v, (list, tuple)) for v in value):
            for i, row in enumerate(value):
                if len(row) == 0 or not all(
                    isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in row
                ):
                    raise OsscarConfigError(
                        f"dataset row {i} must be a non-empty list of int token ids, got {_summarise(row)}"
                    )
            return [[int(t) for t in row] for row in value]
        raise OsscarConfigError(
            "dataset as a list must hold only str (texts), only lists of int (token ids) or only PIL images, got "
            f"{_summarise(value)}"
        )
    raise OsscarConfigError(f"dataset must be {_DATASET_ACCEPTED}; got a {type(value).__name__}")


def _check_solver_dtype(value: Any) -> str:
    if isinstance(value, torch.dtype):
        for name, dtype in _SOLVER_DTYPES.items():
            if value == dtype:
                return name
    elif isinstance(value, str) and value in _SOLVER_DTYPES:
        return value
    raise OsscarConfigError(
        f"solver_dtype must be one of {sorted(_SOLVER_DTYPES)} (or torch.float32 / torch.float64), got {value!r}"
    )


def _check_device(value: Any) -> str:
    if isinstance(value, torch.device):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip().lower()
    else:
        text = None
    if text is None or not _DEVICE_RE.match(text):
        raise OsscarConfigError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device of those, got {value!r}"
        )
    return text


def _check_activation_storage(value: Any) -> str:
    text = value.strip().lower() if isinstance(value, str) else None
    if text not in ACTIVATION_STORAGE_MODES:
        raise OsscarConfigError(
            f"activation_storage must be one of {list(ACTIVATION_STORAGE_MODES)}, got {value!r}"
        )
    return text


def _check_activation_dir(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise OsscarConfigError(
            f"activation_dir must be None or a non-empty folder path (str or os.PathLike), got {value!r}"
        )
    return value


def _dataset_to_json(value: Any, text_column: str) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and _is_pil_image(value[0]):
        return describe_dataset(value)  # images have no JSON form: their description stands in
    if isinstance(value, torch.Tensor):
        return [[int(t) for t in row] for row in value.tolist()]
    if _is_hf_dataset(value):
        return list(value[text_column]) if text_column in value.column_names else describe_dataset(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], str):
            return list(value)
        return [[int(t) for t in row] for row in value]
    raise OsscarConfigError(f"dataset of type {type(value).__name__} cannot be serialised")  # pragma: no cover


def _check_block_shapes(value: Any) -> list[dict[str, int]] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise OsscarConfigError(
            f"block_shapes must be None or a non-empty list with one dict per decoder block, got {_summarise(value)}"
        )
    shapes = []
    for i, shape in enumerate(value):
        if isinstance(shape, dict) and set(shape) == {CHANNEL_SHAPE_KEY}:
            shapes.append(_check_channel_shape(i, shape[CHANNEL_SHAPE_KEY]))
            continue
        if not isinstance(shape, dict) or set(shape) - {SHARED_SHAPE_KEY} != set(BLOCK_SHAPE_KEYS):
            raise OsscarConfigError(
                f"block_shapes[{i}] must be a dict with exactly the keys {list(BLOCK_SHAPE_KEYS)} (and "
                f"{SHARED_SHAPE_KEY!r} for a shared expert), or for a CNN block only {CHANNEL_SHAPE_KEY!r}, got "
                f"{_summarise(shape)}"
            )
        counts = {}
        for key in shape:
            count = shape[key]
            if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
                raise OsscarConfigError(f"block_shapes[{i}][{key!r}] must be an int >= 0, got {count!r}")
            counts[key] = int(count)
        heads, kv = counts["num_attention_heads"], counts["num_key_value_heads"]
        if (kv == 0) != (heads == 0) or (kv and heads % kv):
            raise OsscarConfigError(
                f"block_shapes[{i}]: num_attention_heads={heads} must be a multiple of num_key_value_heads={kv} "
                "(both 0 for a block that lost every head)"
            )
        shapes.append(counts)
    return shapes


def _check_channel_shape(i: int, widths: Any) -> dict[str, list[int]]:
    if not isinstance(widths, (list, tuple)) or not all(
            isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 1 for w in widths):
        raise OsscarConfigError(
            f"block_shapes[{i}][{CHANNEL_SHAPE_KEY!r}] must be a list of ints >= 1 (a CNN block's inner widths; empty "
            f"for a block without any, such as timm's DepthwiseSeparableConv), got {_summarise(widths)}")
    return {CHANNEL_SHAPE_KEY: [int(w) for w in widths]}


def _check_library_versions(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise OsscarConfigError(
            f"library_versions must be None or a dict of str to str (library -> version), got {_summarise(value)}"
        )
    return dict(value)


def library_versions() -> dict[str, str]:
    """The versions of the libraries that shape a pruned checkpoint: osscar_hf, transformers and torch."""
    import transformers

    return {"osscar_hf": __version__, "transformers": transformers.__version__, "torch": torch.__version__}


def describe_dataset(value: Any, text_column: str = "text") -> str | None:
    """A short JSON-able stand-in for calibration data, stored in a model's config instead of the data.

    Names and paths are kept as they are; in-memory data becomes ``"<in-memory calibration data: ...>"`` with
    its size and a SHA-256 of its JSON form (a ``datasets.Dataset`` is described by its fingerprint).
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if _is_hf_dataset(value):
        column = (f"column {text_column!r}" if text_column in value.column_names
                  else f"columns {value.column_names}")  # a dataset of images
        return (
            f"<in-memory calibration data: datasets.Dataset, {len(value)} rows, {column}, "
            f"fingerprint {getattr(value, '_fingerprint', None)}>"
        )
    import hashlib

    if isinstance(value, (list, tuple)) and value and _is_pil_image(value[0]):
        return _describe_images(value)
    data = _dataset_to_json(value, text_column)
    digest = hashlib.sha256(json.dumps(data, separators=(",", ":")).encode("utf-8")).hexdigest()[:16]
    if data and isinstance(data[0], str):
        size = f"{len(data)} texts, {sum(len(t) for t in data)} chars"
    else:
        size = f"{len(data)} rows of token ids, {sum(len(r) for r in data)} tokens"
    return f"<in-memory calibration data: {size}, sha256 {digest}>"


def _describe_images(images: list[Any]) -> str:
    """``"<in-memory calibration data: N images, sha256 ...>"``: the digest covers every image's mode, size and
    pixels."""
    import hashlib

    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return f"<in-memory calibration data: {len(images)} images, sha256 {digest.hexdigest()[:16]}>"


def _parse_version(text: Any):
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(text))
    except InvalidVersion:
        raise OsscarConfigError(f"osscar_version must be a version string such as '0.1.0', got {text!r}") from None


# --------------------------------------------------------------------------- the config
@dataclass(eq=False, repr=False)
class OsscarConfig(QuantizationConfigMixin):
    """Settings of an OSSCAR structured-pruning run.

    Args:
        attention_sparsity: fraction of the attention structures (see ``attention_structure``) removed in every
            block, in [0, 1). The count removed is ``round(n * attention_sparsity)`` (see :func:`keep_count`).
        attention_structure: what the attention loses: ``"kv_groups"`` (the default: whole KV groups, each a key and
            value head with the query heads that share it; a single head in a model without grouped-query
            attention) or ``"query_heads"`` (query heads: every KV head is kept and the same number of query heads
            is removed from every KV group, so the model keeps the stock grouped-query shape; needs a model with
            more query heads than KV heads). With ``"query_heads"`` a block's attention structures, the unit of
            ``attention_sparsity``, ``block_sizes`` and the budgets, are its query heads per KV head (a structure
            is one query head of every KV group); a block that keeps none loses its KV heads too.
        mlp_sparsity: fraction of FFN neurons removed in every block, in [0, 1).
        channel_sparsity: for a CNN (ResNet, MobileNetV2: see ``docs/vision.md``), the fraction of every residual
            block's inner channels removed, in [0, 1), the same for each inner width (``round(width *
            channel_sparsity)`` channels removed). Excludes the language-model sparsities and ``block_sizes``.
        sparsity: instead of the two per-block fractions, the fraction in [0, 1) of the decoder blocks' total
            parameters (or multiply-adds, see ``sparsity_target``) to remove, leaving osscar_hf to choose every
            block's attention and MLP sizes (see ``allocation``). Embeddings and the LM head are not counted and
            never pruned. Excludes ``attention_sparsity``/``mlp_sparsity`` and ``block_sizes``. For a CNN: the
            fraction of its residual blocks' parameters (or multiply-adds per image at the calibration size) removed,
            every inner width chosen by osscar_hf (``docs/vision.md``); excludes ``channel_sparsity``.
        sparsity_target: what ``sparsity`` counts: ``"params"`` (the default) or ``"flops"`` (multiply-adds per
            token at ``seq_len``, the attention scores included: they shrink with the heads).
        allocation: how ``sparsity`` is spent: ``"global"`` (sizes chosen per block and part from damage
            measured on held-out calibration windows; methods with an allocation of their own, FLAP's, use it),
            ``"uniform"`` (every block loses the same fraction of its attention structures and the same number of
            neurons), or ``"auto"`` (the default: ``"global"`` for methods that have one, else ``"uniform"``).
        block_sizes: the caller's own allocation: one dict ``{"attention": kept structures, "mlp": kept neurons}``
            per decoder block (attention structures: KV groups, or query heads per KV group, see
            ``attention_structure``). Excludes the sparsities.
        round_to: kept neuron counts are multiples of this (or the full width), for fast matmuls and for runtimes
            that need it; budgets are met as closely as the rounding allows. Default 1.
        min_part_keep: a global allocation keeps at least this fraction (rounded up) of each part's structures in
            every block, in [0, 1]; 0 lets a block lose its whole attention or MLP when the budget says so.
        min_block_keep: a global allocation keeps at least this fraction of every block's cost, in [0, 1].
        allocation_samples: windows of ``seq_len`` tokens of the calibration data, overlapping none of the
            calibration windows, on which OSSCAR's global allocation measures damage (>= 1; default 8); for a CNN,
            images of the dataset that are not calibration images.
        reuse_planning_grams: OSSCAR's global allocation solves every block at its planned sizes on the Gram
            matrices its planning accumulated in the uniformly pruned model (no second pass over the calibration
            data; better and faster on SmolLM2, see ``docs/budgets.md``). False: a fresh sequential pass at the
            planned sizes. Holding the Grams costs one ``p x p`` float32 matrix per consumer until its block is
            pruned (in memory for ``prune``, in the partial folder for ``prune_checkpoint``).
        allocation_search: candidates (>= 0; default 0, off) of a search that refines OSSCAR's global allocation:
            each a budget-neutral exchange of structures between two blocks, built as the pruning pass builds it
            and kept when the whole model's KL divergence from the dense model on the held-out windows is lower
            (``docs/budgets.md``), on three in four of the held-out windows; of the plans it takes, the one of
            lowest KL on the others (validation windows) is pruned. Costs a few block forwards and solves per
            candidate (with more than ``batch_size`` held-out windows, a candidate not better on every fourth batch
            of them is not run on the rest); needs ``reuse_planning_grams``.
        method: the selection method, one of :func:`osscar_hf.methods.method_names`: ``"osscar"`` (the default),
            ``"obs_greedy"``, ``"magnitude"``, ``"wanda_sp"``, ``"flap"``. See :mod:`osscar_hf.methods`.
        dataset: calibration data: a name (``"c4"``, ``"wikitext2"``, ``"ptb"``, loaded from the Hub), a path
            to a ``.txt`` / ``.jsonl`` / ``.parquet`` file, a list of texts, token ids (a 2-D integer tensor
            or a list of lists of int, used as windows directly) or a ``datasets.Dataset``. See
            :func:`osscar_hf.calibration.build_calibration_windows`. ``"self"`` (data-free calibration): the
            windows, and the held-out windows of a global allocation, are sampled from the dense model being
            pruned, seeded with ``seed`` (see :mod:`osscar_hf.self_calibration`); in-memory pruning only, since
            ``prune_checkpoint`` never holds the whole model. The name ``"self"`` is reserved: a file of that
            name is given as ``"./self"``.
        text_column: column (or JSON field) holding the text in a ``datasets.Dataset``, ``.jsonl`` or
            ``.parquet`` dataset.
        image_column: column holding the images in a ``datasets.Dataset`` of calibration images (default
            ``"image"``).
        num_samples: number of calibration windows (>= 1).
        seq_len: tokens per calibration window (>= 1); the pipeline caps it at the model's context length.
        seed: seed of the window sampling (>= 0).
        damping: ridge added to each Gram matrix, relative to its mean diagonal (``G + damping *
            mean(diag(G)) * I``). Any finite value >= 0; 0 disables damping (a singular Gram matrix then
            fails to factorise and the solver reports it). Typical values are 1e-3 to 1e-1.
        mlp_step: neurons removed per step of the stage-A elimination (>= 1).
        attention_step: heads / KV groups removed per step of the stage-A elimination (>= 1).
        local_search: run the stage-B swap local search after stage A.
        local_search_iters: iterations of the local search (>= 0).
        mlp_swap_size: neurons considered per local-search swap (>= 1).
        attention_swap_size: heads / KV groups considered per local-search swap (>= 1).
        propagate: feed each pruned block's outputs to the next block (sequential pruning); if False,
            every block sees the dense model's inputs.
        dense_targets: fit each block to the dense model's outputs instead of the outputs of the dense
            block on pruned inputs; requires ``propagate=True``.
        solver_dtype: dtype of the linear algebra, ``"float32"`` or ``"float64"`` (``torch.float32`` /
            ``torch.float64`` are accepted and stored as the string).
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a
            ``torch.device``; stored as a string.
        batch_size: calibration windows per forward pass (>= 1).
        block_shapes: set on the config stored in a pruned model (``model.config.quantization_config``): one
            dict per decoder block with its ``num_attention_heads``, ``num_key_value_heads`` and ``ffn_dim``.
            ``None`` (the default) in a config given to the pruner.
        library_versions: set with ``block_shapes``: the versions of osscar_hf, transformers and torch that
            pruned the model (library name -> version string).
        activation_storage: where the calibration activations carried from block to block are kept:
            ``"memory"`` (host memory), ``"disk"`` (one file per batch, read back one batch at a time) or
            ``"auto"`` (the default: disk when the loop's estimated footprint, windows x seq_len x hidden size x
            element size per stream times the streams held at once, exceeds a fraction of the host's available
            memory, see :data:`osscar_hf.activations.DISK_THRESHOLD_FRACTION`). Never changes the result.
        activation_dir: folder in which the on-disk activations get a fresh sub-folder (created if needed),
            removed at the end of the run, also on errors; ``None`` (the default): under
            ``tempfile.gettempdir()``. An ``os.PathLike`` is stored as a str. Never changes the result.

    The two sparsities may be given positionally; every other field is keyword-only.
    """

    attention_sparsity: float = 0.0
    mlp_sparsity: float = 0.0
    _: KW_ONLY
    sparsity: float | None = None
    channel_sparsity: float = 0.0
    sparsity_target: str = "params"
    allocation: str = "auto"
    block_sizes: list[dict[str, int]] | None = None
    attention_structure: str = "kv_groups"
    round_to: int = 1
    min_part_keep: float = 0.05
    min_block_keep: float = 0.2
    allocation_samples: int = 8
    reuse_planning_grams: bool = True
    allocation_search: int = 0
    method: str = "osscar"
    dataset: str | list[str] | list[list[int]] | torch.Tensor | datasets.Dataset | None = None
    text_column: str = "text"
    image_column: str = "image"
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    damping: float = 0.01
    mlp_step: int = 10
    attention_step: int = 2
    local_search: bool = True
    local_search_iters: int = 30
    mlp_swap_size: int = 10
    attention_swap_size: int = 5
    propagate: bool = True
    dense_targets: bool = False
    solver_dtype: str = "float64"
    device: str = "auto"
    batch_size: int = 8
    block_shapes: list[dict[str, int]] | None = None
    library_versions: dict[str, str] | None = None
    activation_storage: str = "auto"
    activation_dir: str | None = None
    quant_method: str = field(default=QUANT_METHOD, init=False)

    # Fields that never change a pruning's result (only where intermediate data is kept): left out of what a
    # pruned model's config records and of the streaming resume fingerprint.
    RESULT_NEUTRAL_FIELDS: ClassVar[tuple[str, ...]] = ("activation_storage", "activation_dir")
    # Fields added after the first release: written by to_dict only when they differ from their defaults, so a
    # model pruned with the paper's settings records the config that earlier osscar_hf versions wrote and read.
    OPTIONAL_FIELDS: ClassVar[tuple[str, ...]] = (
        "sparsity", "sparsity_target", "allocation", "block_sizes", "round_to", "min_part_keep", "min_block_keep",
        "allocation_samples", "method", "attention_structure", "channel_sparsity", "image_column",
        "reuse_planning_grams", "allocation_search",
    )

    def __post_init__(self) -> None:
        self.post_init()

    # ----------------------------------------------------------------- validation
    def post_init(self) -> None:
        """Validate and normalise every field; raise ``OsscarConfigError`` on the first bad one."""
        self.quant_method = QUANT_METHOD
        self.attention_sparsity = _check_fraction("attention_sparsity", self.attention_sparsity)
        self.mlp_sparsity = _check_fraction("mlp_sparsity", self.mlp_sparsity)
        self._check_budget_fields()
        if not isinstance(self.text_column, str) or not self.text_column:
            raise OsscarConfigError(f"text_column must be a non-empty str, got {self.text_column!r}")
        if not isinstance(self.image_column, str) or not self.image_column:
            raise OsscarConfigError(f"image_column must be a non-empty str, got {self.image_column!r}")
        self.dataset = _check_dataset(self.dataset, self.text_column, self.image_column)
        self.num_samples = _check_int("num_samples", self.num_samples, 1)
        self.seq_len = _check_int("seq_len", self.seq_len, 1)
        self.seed = _check_int("seed", self.seed, 0)
        if (
            isinstance(self.damping, bool)
            or not isinstance(self.damping, numbers.Real)
            or not math.isfinite(self.damping)
            or self.damping < 0
        ):
            raise OsscarConfigError(f"damping must be a finite number >= 0, got {self.damping!r}")
        self.damping = float(self.damping)
        self.mlp_step = _check_int("mlp_step", self.mlp_step, 1)
        self.attention_step = _check_int("attention_step", self.attention_step, 1)
        self.local_search = _check_bool("local_search", self.local_search)
        self.local_search_iters = _check_int("local_search_iters", self.local_search_iters, 0)
        self.mlp_swap_size = _check_int("mlp_swap_size", self.mlp_swap_size, 1)
        self.attention_swap_size = _check_int("attention_swap_size", self.attention_swap_size, 1)
        self.propagate = _check_bool("propagate", self.propagate)
        self.dense_targets = _check_bool("dense_targets", self.dense_targets)
        self.reuse_planning_grams = _check_bool("reuse_planning_grams", self.reuse_planning_grams)
        if self.dense_targets and not self.propagate:
            raise OsscarConfigError(
                "dense_targets=True requires propagate=True (got propagate=False): dense targets are only "
                "meaningful when pruned outputs are fed to the next block"
            )
        if not isinstance(self.method, str) or not self.method:
            raise OsscarConfigError(f"method must be a non-empty str (a registered method's name), got {self.method!r}")
        self.solver_dtype = _check_solver_dtype(self.solver_dtype)
        self.device = _check_device(self.device)
        self.batch_size = _check_int("batch_size", self.batch_size, 1)
        self.block_shapes = _check_block_shapes(self.block_shapes)
        self.library_versions = _check_library_versions(self.library_versions)
        self.activation_storage = _check_activation_storage(self.activation_storage)
        self.activation_dir = _check_activation_dir(self.activation_dir)

    def _check_budget_fields(self) -> None:
        if self.sparsity is not None:
            self.sparsity = _check_fraction("sparsity", self.sparsity)
        self.sparsity_target = _check_choice("sparsity_target", self.sparsity_target, SPARSITY_TARGETS)
        self.allocation = _check_choice("allocation", self.allocation, ALLOCATIONS)
        self.block_sizes = _check_block_sizes(self.block_sizes)
        self.attention_structure = _check_choice("attention_structure", self.attention_structure,
                                                 ATTENTION_STRUCTURES)
        self.round_to = _check_int("round_to", self.round_to, 1)
        self.min_part_keep = _check_unit_interval("min_part_keep", self.min_part_keep)
        self.min_block_keep = _check_unit_interval("min_block_keep", self.min_block_keep)
        self.allocation_samples = _check_int("allocation_samples", self.allocation_samples, 1)
        self.allocation_search = _check_int("allocation_search", self.allocation_search, 0)
        self._check_channel_sparsity()
        uniform = [n for n in ("attention_sparsity", "mlp_sparsity") if getattr(self, n)]
        for name, given in (("sparsity", self.sparsity is not None), ("block_sizes", self.block_sizes is not None)):
            if given and uniform:
                raise OsscarConfigError(
                    f"{name} and {' / '.join(uniform)} exclude each other: give either the per-block fractions "
                    f"(attention_sparsity, mlp_sparsity) or {name}")
        if self.sparsity is not None and self.block_sizes is not None:
            raise OsscarConfigError("sparsity and block_sizes exclude each other: give a global sparsity for "
                                    "osscar_hf to allocate, or your own block_sizes")
        if self.allocation_search and (self.sparsity is None or self.allocation == "uniform"
                                       or not self.reuse_planning_grams):
            raise OsscarConfigError(
                f"allocation_search={self.allocation_search} refines OSSCAR's global allocation on the Gram matrices "
                f"its planning keeps; it needs sparsity=... with allocation 'auto' or 'global' and "
                f"reuse_planning_grams=True (got sparsity={self.sparsity}, allocation={self.allocation!r}, "
                f"reuse_planning_grams={self.reuse_planning_grams})")
        if self.sparsity is None and self.allocation != "auto":
            raise OsscarConfigError(
                f"allocation={self.allocation!r} needs a global sparsity (OsscarConfig(sparsity=...)); the per-block "
                "fractions and block_sizes fix every block's sizes themselves")

    def _check_channel_sparsity(self) -> None:
        self.channel_sparsity = _check_fraction("channel_sparsity", self.channel_sparsity)
        if not self.channel_sparsity:
            return
        if self.sparsity is not None:
            raise OsscarConfigError(
                f"channel_sparsity={self.channel_sparsity} (the same fraction of every inner width of a CNN) and "
                f"sparsity={self.sparsity} (a global budget: osscar_hf chooses the widths) exclude each other: give "
                "one of them")
        language = [f"{n}={getattr(self, n)!r}" for n in ("attention_sparsity", "mlp_sparsity", "block_sizes")
                    if getattr(self, n) not in (0.0, None)]
        if language:
            raise OsscarConfigError(
                f"channel_sparsity={self.channel_sparsity} (a CNN's inner channels) excludes the language-model "
                f"budgets, but {', '.join(language)} was given too: give channel_sparsity alone for a CNN, or the "
                "language-model fields alone for a language model")

    def check_method(self) -> None:
        """Check ``method`` against the registry and the other fields (``OsscarPruner`` does, before any work).

        Not part of ``post_init``: a model pruned with a method registered by the user's own code keeps that name
        in its config, and must load where that code is not imported."""
        from osscar_hf.methods import get_method

        method = get_method(self.method)
        if self.dense_targets and not method.refits:
            raise OsscarConfigError(
                f"dense_targets=True re-fits the kept weights to the dense model's outputs, but method "
                f"{self.method!r} does not refit; use it with a refitting method (osscar, obs_greedy)")
        if self.allocation == "global" and self.sparsity is not None and method.allocation is None:
            raise OsscarConfigError(
                f"method {self.method!r} has no global allocation; use allocation='uniform' (or 'auto'), or a method "
                "that has one (osscar, obs_greedy, flap)")

        if self.allocation_search and not self.keeps_planning_grams():
            raise OsscarConfigError(
                f"allocation_search={self.allocation_search} refines OSSCAR's allocation, which method "
                f"{self.method!r} with propagate={self.propagate}, dense_targets={self.dense_targets} does not use; "
                "give a method with OSSCAR's allocation (osscar, obs_greedy), propagate=True, dense_targets=False, "
                "or allocation_search=0")

    def keeps_planning_grams(self) -> bool:
        """Whether a run keeps its planning's Grams for the pruning pass (``osscar_hf.pipeline.kept``): OSSCAR's
        global allocation, a method that selects on the Gram alone, sequential targets (``propagate``, no dense
        targets)."""
        from osscar_hf.methods import GRAM, get_method

        return (self.reuse_planning_grams and self.sparsity is not None and self.resolved_allocation() == "osscar"
                and get_method(self.method).statistics == {GRAM} and self.propagate and not self.dense_targets)

    def resolved_allocation(self) -> str:
        """The allocation a global ``sparsity`` uses: ``"uniform"``, or the name of the method's own allocation
        (``"osscar"``, ``"flap"``) for ``"global"`` (and for ``"auto"`` when the method has one)."""
        from osscar_hf.methods import get_method

        own = get_method(self.method).allocation
        if self.allocation == "uniform" or own is None:
            return "uniform"
        return own

    # ----------------------------------------------------------------- helpers
    def resolved_device(self) -> torch.device:
        """The device to run on: ``"auto"`` becomes CUDA when available, else CPU.

        Raises ``OsscarConfigError`` when CUDA is requested explicitly but is not available.
        """
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise OsscarConfigError(
                    f"device={self.device!r} but CUDA is not available here; use device='cpu' or 'auto'"
                )
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise OsscarConfigError(
                    f"device={self.device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible"
                )
        return device

    def torch_solver_dtype(self) -> torch.dtype:
        """``solver_dtype`` as a ``torch.dtype``."""
        return _SOLVER_DTYPES[self.solver_dtype]

    def for_model_config(self, block_shapes: list[dict[str, int]]) -> OsscarConfig:
        """The copy of this config stored in a pruned model's ``config.quantization_config``.

        It records ``block_shapes`` and the library versions, and replaces in-memory calibration data by a
        short description (:func:`describe_dataset`) so that ``config.json`` stays small. The
        :attr:`RESULT_NEUTRAL_FIELDS` (where activations were kept: machine-specific, e.g. a temporary path) take
        their defaults, so the same pruning gives the same ``config.json`` wherever it ran.
        """
        neutral = set(self.RESULT_NEUTRAL_FIELDS)
        data = {n: getattr(self, n) for n in self.field_names() if n != "quant_method" and n not in neutral}
        data.update(
            dataset=describe_dataset(self.dataset, self.text_column),
            block_shapes=block_shapes,
            library_versions=library_versions(),
        )
        return type(self)(**data)

    @classmethod
    def field_names(cls) -> list[str]:
        """The accepted keys of :meth:`from_dict` that are config fields (``quant_method`` included)."""
        return [f.name for f in fields(cls) if f.name != "_"]

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field plus ``"quant_method": "osscar"``.

        The dataset is written as given for ``None`` / str, as a list of str for texts (a
        ``datasets.Dataset`` becomes the list of its ``text_column``), and as a list of lists of int for
        token ids (tensor or lists). The :attr:`RESULT_NEUTRAL_FIELDS` and :attr:`OPTIONAL_FIELDS` are written only
        when they differ from their defaults, so a pruned model's config (where the former are reset, see
        :meth:`for_model_config`) is, for the paper's settings, the one earlier osscar_hf versions wrote and read;
        :meth:`from_dict` gives missing ones their defaults.
        """
        defaults = _OMITTED_DEFAULTS
        out: dict[str, Any] = {}
        for name in self.field_names():
            value = getattr(self, name)
            if name in defaults and value == defaults[name]:
                continue
            if name == "dataset":
                value = _dataset_to_json(value, self.text_column)
            elif name in ("block_shapes", "block_sizes", "library_versions") and value is not None:
                value = json.loads(json.dumps(value))  # a copy the caller may change freely
            out[name] = value
        return out

    def __iter__(self):
        """``dict(config)`` gives :meth:`to_dict`."""
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OsscarConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        parts = []
        for name in self.field_names():
            if name == "quant_method":
                continue
            value = getattr(self, name)
            if name in self.OPTIONAL_FIELDS and value == _OMITTED_DEFAULTS[name]:
                continue
            if name == "dataset":
                text = self._describe_dataset()
            elif name == "block_shapes" and value is not None:
                text = f"<{len(value)} blocks>"
            else:
                text = repr(value)
            parts.append(f"{name}={text}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def _describe_dataset(self) -> str:
        ds = self.dataset
        if ds is None or isinstance(ds, str):
            return _summarise(ds)
        if isinstance(ds, torch.Tensor):
            return f"<token ids {tuple(ds.shape)[0]}x{tuple(ds.shape)[1]}>"
        if _is_hf_dataset(ds):
            return f"<datasets.Dataset, {len(ds)} rows>"
        if ds and isinstance(ds[0], str):
            return f"<{len(ds)} texts, {sum(len(t) for t in ds)} chars>"
        if ds and _is_pil_image(ds[0]):
            return f"<{len(ds)} images>"
        return f"<token ids, {len(ds)} rows>"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build a config from a dict such as :meth:`to_dict` or a saved JSON file wrote.

        Unknown keys are an error listing them and the accepted keys, unless the dict records an
        ``osscar_version`` newer than this package: then they are dropped with a warning that names them
        (a file saved by a newer osscar_hf stays loadable). ``quant_method`` must be ``"osscar"`` when
        present. The version keys written by :meth:`to_json_file` are accepted and ignored.

        As in ``QuantizationConfigMixin.from_dict``, keyword arguments that are field names override the
        dict's values; the others are returned as unused when ``return_unused_kwargs`` is True (and
        otherwise ignored).
        """
        if not isinstance(config_dict, dict):
            raise OsscarConfigError(f"config_dict must be a dict, got a {type(config_dict).__name__}")
        data = dict(config_dict)
        quant_method = data.pop("quant_method", QUANT_METHOD)
        if str(getattr(quant_method, "value", quant_method)) != QUANT_METHOD:
            raise OsscarConfigError(f"quant_method must be {QUANT_METHOD!r} for an OsscarConfig, got {quant_method!r}")
        saved_version = data.get("osscar_version")
        for key in VERSION_KEYS:
            data.pop(key, None)

        accepted = [n for n in cls.field_names() if n != "quant_method"]
        unknown = sorted(k for k in data if k not in accepted)
        if unknown:
            if saved_version is not None and _parse_version(saved_version) > _parse_version(__version__):
                logger.warning(
                    "OsscarConfig saved by osscar_hf %s (this is %s): dropping unknown keys %s",
                    saved_version,
                    __version__,
                    unknown,
                )
                for key in unknown:
                    del data[key]
            else:
                raise OsscarConfigError(
                    f"unknown OsscarConfig keys {unknown}; accepted keys are "
                    f"{sorted(accepted + ['quant_method', *VERSION_KEYS])}"
                )

        unused = {}
        for key, value in kwargs.items():
            if key in accepted:
                data[key] = value
            else:
                unused[key] = value
        config = cls(**data)
        return (config, unused) if return_unused_kwargs else config

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the given fields (validated together); return the kwargs that are not fields."""
        accepted = [n for n in self.field_names() if n != "quant_method"]
        known = {k: v for k, v in kwargs.items() if k in accepted}
        new = type(self)(**{**{n: getattr(self, n) for n in accepted}, **known})  # validates
        for name in accepted:
            setattr(self, name, getattr(new, name))
        return {k: v for k, v in kwargs.items() if k not in accepted}

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """Write the config as JSON, atomically, with the library versions that wrote it.

        The file holds :meth:`to_dict` plus ``osscar_version``, ``transformers_version`` and
        ``torch_version``; :meth:`from_json_file` reads it back to an equal config.
        """
        import transformers

        payload = self.to_dict()
        payload["osscar_version"] = __version__
        payload["transformers_version"] = transformers.__version__
        payload["torch_version"] = torch.__version__
        text = json.dumps(payload, indent=2, sort_keys=True) + "\n"

        path = os.fspath(json_file_path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".osscar_config.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    @classmethod
    def from_json_file(cls, json_file_path: str | os.PathLike) -> OsscarConfig:
        """Read a config written by :meth:`to_json_file` (or any JSON object accepted by :meth:`from_dict`)."""
        path = os.fspath(json_file_path)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise OsscarConfigError(f"config file {path!r} does not exist") from None
        except json.JSONDecodeError as exc:
            raise OsscarConfigError(f"config file {path!r} is not valid JSON: {exc}") from None
        return cls.from_dict(data)


_OMITTED_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(OsscarConfig)
    if f.name in OsscarConfig.RESULT_NEUTRAL_FIELDS + OsscarConfig.OPTIONAL_FIELDS
}
