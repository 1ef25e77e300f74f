"""Configuration of a checkpoint pruned with OSSCAR whose decoder blocks each have their own shape.

Written beside the weights by osscar_hf (``save_pruned(model, folder, format="remote_code")``). Loading needs
only torch and transformers:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

The stock fields are those of the model the checkpoint was pruned from: a stock model built from them has
the unpruned block shapes. The ``osscar_*`` fields say how ``modeling_osscar.py`` shrinks every block:

- ``osscar_block_shapes``: one ``{"num_attention_heads", "num_key_value_heads", "ffn_dim"}`` per block.
- ``osscar_layout``: where the blocks live and which linears make up a block (module paths), the module
  attributes holding a count (``{path: "heads" | "kv_heads" | "ffn"}``), ``n_rep`` (query heads per KV head)
  and ``head_dim``.
- ``osscar_base_model_type``: the stock ``model_type`` of the family; ``osscar_format_version``: the layout of
  these fields; ``osscar_pruning``: the pruning settings, for provenance only.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

BASE_MODEL_TYPE = "llama"
OSSCAR_FORMAT_VERSION = 1
BLOCK_SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "ffn_dim")
LAYOUT_PATH_KEYS = ("blocks", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "mlp_consumer")
COUNT_KINDS = ("heads", "kv_heads", "ffn")


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and all(part.isidentifier() or part.isdigit() for part in value.split("."))


def check_layout(layout: Any) -> None:
    """Raise ``ValueError`` (``TypeError`` for a non-dict) naming the first bad entry of ``osscar_layout``."""
    if not isinstance(layout, dict):
        raise TypeError(f"osscar_layout must be a dict, got {type(layout).__name__}")
    for key in LAYOUT_PATH_KEYS:
        if not _is_path(layout.get(key)):
            raise ValueError(f"osscar_layout[{key!r}] must be a dotted module path, got {layout.get(key)!r}")
    for key in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not layout[key].isidentifier():
            raise ValueError(
                f"osscar_layout[{key!r}] must name a direct child of the attention, got {layout[key]!r}"
            )
    producers = layout.get("mlp_producers")
    if not isinstance(producers, list) or not producers or not all(_is_path(p) for p in producers):
        raise ValueError(
            f"osscar_layout['mlp_producers'] must be a non-empty list of module paths, got {producers!r}"
        )
    counts = layout.get("count_attributes", {})
    if not isinstance(counts, dict) or not all(_is_path(k) and v in COUNT_KINDS for k, v in counts.items()):
        raise ValueError(
            "osscar_layout['count_attributes'] must map module attribute paths to one of "
            f"{list(COUNT_KINDS)}, got {counts!r}"
        )
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
        if not isinstance(shape, dict) or sorted(shape) != sorted(BLOCK_SHAPE_KEYS):
            raise ValueError(
                f"osscar_block_shapes[{index}] must have exactly the keys {list(BLOCK_SHAPE_KEYS)}, "
                f"got {shape!r}"
            )
        if not all(_is_count(shape[key], 0) for key in BLOCK_SHAPE_KEYS):
            raise ValueError(f"osscar_block_shapes[{index}] must hold ints >= 0, got {shape!r}")
        if shape["num_attention_heads"] != shape["num_key_value_heads"] * n_rep:
            raise ValueError(
                f"osscar_block_shapes[{index}] = {shape!r} does not have n_rep = {n_rep} query heads per "
                "KV head"
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
        check_block_shapes(self.osscar_block_shapes, self.num_hidden_layers, self.osscar_layout["n_rep"])


__all__ = ["OsscarLlamaConfig"]
