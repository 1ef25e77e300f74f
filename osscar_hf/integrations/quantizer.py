"""``OsscarHfQuantizer``: loads pruned checkpoints whose blocks have shapes the stock config cannot express.

transformers calls it from ``from_pretrained`` when ``config.json`` has ``quantization_config`` with
``"quant_method": "osscar"``. Before the weights load, while the model is a skeleton on the meta device, it
resizes every decoder block to the shapes in ``quantization_config.block_shapes``; transformers then computes
the device map (``device_map="auto"`` sees the pruned sizes) and loads the weights as usual. Nothing is
quantized: the weights are ordinary full-precision tensors, so the model behaves like any other (``.half()``,
``.float()``, ``.to(dtype)``, ``torch.compile``, training, ``save_pretrained``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

# Only transformers.quantizers.base: this module is imported while transformers imports its quantizer
# registry, which transformers.modeling_utils is itself importing (see osscar_hf.integrations).
from transformers.quantizers.base import HfQuantizer

from ..config import OsscarConfig
from ..errors import NotDequantizableError, OsscarError
from ..io.shapes import apply_block_shapes

if TYPE_CHECKING:  # pragma: no cover
    from transformers.modeling_utils import PreTrainedModel

logger = logging.getLogger(__name__)

__all__ = ["NotDequantizableError", "OsscarHfQuantizer"]


class OsscarHfQuantizer(HfQuantizer):
    """The transformers quantizer of ``quant_method="osscar"`` (structured pruning, full-precision weights)."""

    # A dense checkpoint cannot be pruned on load; validate_environment says so (the base class's own
    # message for requires_calibration=True would talk about quantized weights).
    requires_calibration = False

    def __init__(self, quantization_config: OsscarConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise OsscarError(
                "osscar_hf does not prune while loading: load the dense model, then prune it with "
                "osscar_hf.OsscarPruner(config).prune(model, tokenizer)"
            )
        if self.quantization_config.block_shapes is None:
            raise OsscarError(
                "this checkpoint's quantization_config has quant_method='osscar' but no block_shapes: it was not "
                "written by osscar_hf's save path, so the shape of each block is unknown"
            )

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        apply_block_shapes(model, self.quantization_config.block_shapes)
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        # transformers flags "quantized" models, which makes `.half()`/`.float()` raise and tells attention
        # kernels to pick a dtype from the config. The weights here are plain tensors: clear the flags.
        from transformers.modeling_utils import PreTrainedModel

        model.is_quantized = False
        for module in model.modules():
            if isinstance(module, PreTrainedModel) and "_is_quantized" in module.config.__dict__:
                del module.config._is_quantized
        return model

    def _dequantize(self, model: PreTrainedModel, dtype: Any = None) -> PreTrainedModel:
        raise NotDequantizableError(
            "model.dequantize() does not apply to an osscar-pruned model: its weights are already full precision "
            "(change the dtype with model.to(dtype)), and removing its quantization_config would drop the "
            "per-block shapes it needs to be saved and loaded again. Nothing was changed."
        )

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _register_on_import() -> None:
    # Importing this module first (before transformers' quantizer registry) must register too: see
    # osscar_hf.integrations.register, which defers to this call while the module is half-run.
    from . import register

    register()


_register_on_import()
