"""Saving and loading pruned checkpoints.

    from osscar_hf.io import save_pruned
    save_pruned(pruned, "out", tokenizer=tok)          # stock checkpoint when expressible, else osscar format
    save_pruned(pruned, "out", format="remote_code")   # loads with trust_remote_code=True, no osscar_hf needed

See :mod:`osscar_hf.io.save` (formats, safety rules), :mod:`osscar_hf.io.shapes` (per-block shapes), :mod:`osscar_hf.io.model_config` (writing
the pruned shapes into a model's config) and
:mod:`osscar_hf.io.remote_code` (the remote-code format).
"""

from .model_config import switch_on_part_biases, update_model_config
from .save import FORMATS, SaveError, pruning_record, resolve_format, save_pruned
from .shapes import (
    apply_block_shapes,
    config_block_shape,
    osscar_quantization_config,
    read_block_shapes,
    stock_config_expresses,
)

__all__ = [
    "FORMATS",
    "SaveError",
    "apply_block_shapes",
    "config_block_shape",
    "osscar_quantization_config",
    "pruning_record",
    "read_block_shapes",
    "resolve_format",
    "save_pruned",
    "stock_config_expresses",
    "switch_on_part_biases",
    "update_model_config",
]
