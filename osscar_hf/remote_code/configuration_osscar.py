"""Configuration of a checkpoint pruned with OSSCAR whose decoder blocks each have their own shape.

Written beside the weights by osscar_hf (``save_pruned(model, folder, format="remote_code")``). Loading needs
only torch and transformers:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

The stock fields are those of the model the checkpoint was pruned from: a stock model built from them has
the unpruned block shapes. The ``osscar_*`` fields say how ``modeling_osscar.py`` shrinks every block:

- ``osscar_block_shapes``: one ``{"num_attention_heads", "num_key_value_heads", "ffn_dim"}`` per block.
- ``osscar_layout``: where the blocks live and which linears make up a block (module paths), which output rows
  of each producer belong to which structure (see :func:`kept_rows`), the module attributes holding a count
  (``{path: "heads" | "kv_heads" | "n_rep" | "ffn"}``), ``n_rep`` (query heads per KV head in the unpruned model; a
  block may keep fewer, the same number for each of its KV heads) and ``head_dim``; for a
  family whose checkpoints name a tensor unlike its model (GPT-NeoX's ``embed_out``), ``checkpoint_renames``
  (``{prefix in the checkpoint: prefix in the model}``).
- ``osscar_base_model_type``: the stock ``model_type`` of the family; ``osscar_format_version``: the layout of
  these fields; ``osscar_pruning``: the pruning settings, for provenance only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig

BASE_MODEL_TYPE = "llama"
OSSCAR_FORMAT_VERSION = 1
BLOCK_SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "ffn_dim")
SHARED_SHAPE_KEY = "shared_ffn_dim"  # a shared expert's width, in the shapes of a model that has one
LAYOUT_PATH_KEYS = ("blocks", "attention", "o_proj", "mlp_consumer")
COUNT_KINDS = ("heads", "kv_heads", "n_rep", "ffn")
# The kinds of output rows a producer holds, by the part whose structures they belong to.
ROW_KINDS = {"q": "attention", "k": "attention", "v": "attention", "neurons": "mlp"}


# --------------------------------------------------------------------------- the row layout of a producer
# Shared with osscar_hf, whose surgery imports these functions from this file: the rows a pruned model keeps and
# the rows this file keeps when it rebuilds the model's blocks come from one definition.
def rows_per_structure(kind: str, n_rep: int, head_dim: int) -> int:
    """Output rows one structure has in a segment of ``kind``: a KV group's ``n_rep`` query heads ("q"), its key
    or value head ("k", "v"), one FFN neuron ("neurons")."""
    return {"q": n_rep * head_dim, "k": head_dim, "v": head_dim, "neurons": 1}[kind]


def structure_stride(segments: Any, n_rep: int, head_dim: int) -> int:
    """Output rows of one structure over all ``segments`` of a producer."""
    return sum(rows_per_structure(kind, n_rep, head_dim) for kind in segments)


def kept_query_heads(kept: torch.Tensor, n_rep: int, per_group: int | None = None) -> torch.Tensor:
    """The query heads (int64 indices among ``total * n_rep``, on the CPU, increasing) of the ``kept`` KV groups:
    each group's first ``per_group`` heads (all ``n_rep`` when None)."""
    kept = torch.as_tensor(kept, dtype=torch.int64, device="cpu")
    per_group = n_rep if per_group is None else per_group
    return (kept.unsqueeze(1) * n_rep + torch.arange(per_group, dtype=torch.int64, device="cpu")).reshape(-1)


def kept_rows(segments: Any, interleaved: bool, kept: torch.Tensor, total: int, n_rep: int,
              head_dim: int, kept_heads: torch.Tensor | None = None) -> torch.Tensor:
    """The output rows (int64, on the CPU, increasing) of a producer that belong to the ``kept`` structures
    (increasing indices among ``total``).

    ``segments``: the producer's row blocks in order, each a kind of :data:`ROW_KINDS`. Not ``interleaved``
    (kind-major): all structures' rows of the first segment, then of the next, e.g. ``["q", "k", "v"]`` for a
    fused ``[q heads | k heads | v heads]`` projection, ``["neurons", "neurons"]`` for a fused ``[gate | up]``.
    ``interleaved`` (structure-major): every structure's rows of all segments together, e.g. per head ``[q|k|v]``.
    ``kept_heads``: for an attention producer whose KV groups keep only some of their query heads, the kept query
    heads (increasing indices among ``total * n_rep``, each in a kept group): the ``"q"`` rows are theirs; None
    keeps every query head of the kept groups.
    """
    kept = torch.as_tensor(kept, dtype=torch.int64, device="cpu")
    heads = kept_query_heads(kept, n_rep) if kept_heads is None else torch.as_tensor(
        kept_heads, dtype=torch.int64, device="cpu")
    widths = [rows_per_structure(kind, n_rep, head_dim) for kind in segments]
    span = torch.arange(head_dim, dtype=torch.int64, device="cpu")
    stride = sum(widths) if interleaved else 0
    parts, offset = [], 0
    for kind, width in zip(segments, widths):
        if kind == "q":  # a query head's rows: head_dim of them, at its place within its group's n_rep heads
            base = (heads // n_rep) * stride + (heads % n_rep) * head_dim if interleaved else heads * head_dim
            rows = base.unsqueeze(1) + span
        else:
            start = kept * (stride if interleaved else width)
            rows = start.unsqueeze(1) + torch.arange(width, dtype=torch.int64, device="cpu")
        parts.append(offset + rows.reshape(-1))
        offset += width if interleaved else total * width
    if not parts:
        return kept
    rows = torch.cat(parts)
    return rows.sort().values if interleaved else rows


def producer_entries(entries: Any, default_kind: str) -> list[tuple[str, tuple[str, ...], bool]]:
    """``(path, segments, interleaved)`` of every producer entry of ``osscar_layout``: a bare path is a producer
    whose rows are one segment of ``default_kind``; a dict has ``path``, ``segments`` and ``interleaved``."""
    out = []
    for entry in entries:
        if isinstance(entry, str):
            out.append((entry, (default_kind,), False))
        else:
            out.append((entry["path"], tuple(entry["segments"]), bool(entry.get("interleaved", False))))
    return out


# --------------------------------------------------------------------------- counts a module reads
class OsscarCountView:
    """A module's own view of an object it shares with the other blocks (the model config, which e.g. Phi-3's
    attention reads its head count from): the counts of this block, everything else read from and written to the
    shared object, so later changes to it (the attention implementation, ...) still reach the module."""

    def __init__(self, shared: Any) -> None:
        self.__dict__["osscar_shared"] = shared

    def osscar_override(self, name: str, value: Any) -> None:
        self.__dict__[name] = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "osscar_shared":  # copy/pickle probe before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.__dict__["osscar_shared"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__:
            self.__dict__[name] = value
        else:
            setattr(self.__dict__["osscar_shared"], name, value)


def count_owner(block: nn.Module, path: str) -> tuple[nn.Module, str | None, str]:
    """Where the count at ``path`` (from a block) lives: (module, attribute of the module holding a shared plain
    object, or None when the count is the module's own attribute, count attribute). ``AttributeError`` when a
    module on the path is missing; whether the attributes exist is not checked."""
    owner_path, _, attribute = path.rpartition(".")
    holder = None
    try:
        module = block.get_submodule(owner_path)
    except AttributeError:
        owner_path, _, holder = owner_path.rpartition(".")
        module = block.get_submodule(owner_path)
        if isinstance(getattr(module, holder, None), nn.Module):
            raise
    return module, holder, attribute


def set_count(block: nn.Module, path: str, value: int) -> nn.Module:
    """Set the count at ``path`` (see :func:`count_owner`) to ``value``; one held by a shared object is set in a
    :class:`OsscarCountView` private to the module. Returns the module."""
    module, holder, attribute = count_owner(block, path)
    target = module if holder is None else getattr(module, holder)  # AttributeError when missing
    if not hasattr(target, attribute):
        raise AttributeError(f"count attribute {path!r}: {type(target).__name__} has no {attribute!r}")
    if holder is None:
        setattr(module, attribute, value)
        return module
    if not isinstance(target, OsscarCountView):
        target = OsscarCountView(target)
        setattr(module, holder, target)
    target.osscar_override(attribute, value)
    return module


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and all(part.isidentifier() or part.isdigit() for part in value.split("."))


def _check_producers(key: str, part: str, entries: Any) -> None:
    problem = not isinstance(entries, list) or not entries
    for entry in entries if not problem else ():
        if isinstance(entry, str):
            problem = problem or part != "mlp" or not _is_path(entry)
            continue
        segments = entry.get("segments") if isinstance(entry, dict) else None
        problem = problem or not (
            isinstance(segments, list) and segments and all(ROW_KINDS.get(kind) == part for kind in segments)
            and _is_path(entry.get("path")) and isinstance(entry.get("interleaved", False), bool)
            and (part == "mlp" or entry["path"].isidentifier()))
    if problem:
        raise ValueError(
            f"osscar_layout[{key!r}] must be a non-empty list of producers ({{'path', 'segments' of "
            f"{[k for k, p in ROW_KINDS.items() if p == part]}, 'interleaved'}}), got {entries!r}"
        )


def check_layout(layout: Any) -> None:
    """Raise ``ValueError`` (``TypeError`` for a non-dict) naming the first bad entry of ``osscar_layout``."""
    if not isinstance(layout, dict):
        raise TypeError(f"osscar_layout must be a dict, got {type(layout).__name__}")
    for key in LAYOUT_PATH_KEYS:
        if not _is_path(layout.get(key)):
            raise ValueError(f"osscar_layout[{key!r}] must be a dotted module path, got {layout.get(key)!r}")
    if not layout["o_proj"].isidentifier():
        raise ValueError(f"osscar_layout['o_proj'] must name a direct child of the attention, got {layout['o_proj']!r}")
    for key, part in (("attention_producers", "attention"), ("mlp_producers", "mlp")):
        _check_producers(key, part, layout.get(key))
    counts = layout.get("count_attributes", {})
    if not isinstance(counts, dict) or not all(_is_path(k) and v in COUNT_KINDS for k, v in counts.items()):
        raise ValueError(
            "osscar_layout['count_attributes'] must map module attribute paths to one of "
            f"{list(COUNT_KINDS)}, got {counts!r}"
        )
    shared = layout.get("shared_expert")
    if shared is not None and not (
            isinstance(shared, dict) and isinstance(shared.get("producers"), list) and shared["producers"]
            and all(_is_path(p) for p in shared["producers"]) and _is_path(shared.get("consumer"))
            and isinstance(shared.get("count_attributes"), list)
            and all(_is_path(p) for p in shared["count_attributes"])):
        raise ValueError("osscar_layout['shared_expert'] must be {'producers': [paths], 'consumer': path, "
                         f"'count_attributes': [paths]}}, got {shared!r}")
    for key in ("n_rep", "head_dim"):
        if not _is_count(layout.get(key), 1):
            raise ValueError(f"osscar_layout[{key!r}] must be an int >= 1, got {layout.get(key)!r}")


def check_block_shapes(shapes: Any, num_blocks: int, n_rep: int) -> None:
    """Raise ``ValueError`` naming the first malformed entry of ``osscar_block_shapes``."""
    if not isinstance(shapes, list) or len(shapes) != num_blocks:
        raise ValueError(
            f"osscar_block_shapes must be a list of {num_blocks} block shapes (one per block), got {shapes!r}"
        )
    for index, shape in enumerate(shapes):
        if not isinstance(shape, dict) or set(shape) - {SHARED_SHAPE_KEY} != set(BLOCK_SHAPE_KEYS):
            raise ValueError(
                f"osscar_block_shapes[{index}] must have exactly the keys {list(BLOCK_SHAPE_KEYS)} (and "
                f"{SHARED_SHAPE_KEY!r} with a shared expert), got {shape!r}"
            )
        if not all(_is_count(shape[key], 0) for key in shape):
            raise ValueError(f"osscar_block_shapes[{index}] must hold ints >= 0, got {shape!r}")
        heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
        if not (heads == kv == 0 or (kv > 0 and heads % kv == 0 and 1 <= heads // kv <= n_rep)):
            raise ValueError(
                f"osscar_block_shapes[{index}] = {shape!r} does not have the same number of query heads, 1 to "
                f"n_rep = {n_rep}, for every KV head (or no head at all)"
            )


class OsscarLlamaConfig(LlamaConfig):
    """The family's stock config plus the per-block shapes and module layout of a pruned checkpoint."""

    model_type = "osscar_llama"

    osscar_format_version: int | None = None
    osscar_base_model_type: str | None = None
    osscar_block_shapes: list[dict[str, int]] | None = None
    osscar_layout: dict[str, Any] | None = None
    osscar_pruning: dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.check_osscar_fields()

    def check_osscar_fields(self) -> None:
        """Validate the ``osscar_*`` fields (all absent is a config for the unpruned shapes)."""
        version = self.osscar_format_version
        if version is not None and not (_is_count(version, 1) and version <= OSSCAR_FORMAT_VERSION):
            raise ValueError(
                f"osscar_format_version = {version!r}: this configuration file reads versions 1 to "
                f"{OSSCAR_FORMAT_VERSION}; the checkpoint was written by a newer osscar_hf"
            )
        base = self.osscar_base_model_type
        if base is not None and base != BASE_MODEL_TYPE:
            raise ValueError(
                f"osscar_base_model_type = {base!r}, but this configuration file extends {BASE_MODEL_TYPE!r}"
            )
        if self.osscar_block_shapes is None:
            return
        if self.osscar_layout is None:
            raise ValueError(
                "osscar_block_shapes is set but osscar_layout is missing: the blocks cannot be resized"
            )
        check_layout(self.osscar_layout)
        # The decoder's own config (a multimodal model's text_config) counts the blocks.
        check_block_shapes(self.osscar_block_shapes, self.get_text_config().num_hidden_layers,
                           self.osscar_layout["n_rep"])


__all__ = [
    "OsscarCountView",
    "OsscarLlamaConfig",
    "count_owner",
    "kept_query_heads",
    "kept_rows",
    "producer_entries",
    "rows_per_structure",
    "set_count",
    "structure_stride",
]
