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
import threading
from typing import TYPE_CHECKING, Any

# Only transformers.quantizers.base: this module is imported while transformers imports its quantizer
# registry, which transformers.modeling_utils is itself importing (see osscar_hf.integrations).
from transformers.quantizers.base import HfQuantizer

from ..config import QUANT_METHOD, OsscarConfig
from ..errors import NotDequantizableError, OsscarError
from ..io.shapes import apply_block_shapes

if TYPE_CHECKING:  # pragma: no cover
    from transformers.modeling_utils import PreTrainedModel

logger = logging.getLogger(__name__)

__all__ = ["NotDequantizableError", "OsscarHfQuantizer", "register_quantizer"]

_REGISTRATION_LOCK = threading.Lock()


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


def register_quantizer() -> None:
    """Register :class:`~osscar_hf.config.OsscarConfig` and :class:`OsscarHfQuantizer` with transformers under
    ``quant_method="osscar"`` (idempotent; imports ``transformers.quantizers``).

    Runs when this module is first imported (see :mod:`osscar_hf.integrations`, whose ``register`` calls it).
    Raises ``OsscarError`` when another package registered a different class under ``"osscar"``.
    """
    from transformers.quantizers import auto

    with _REGISTRATION_LOCK:
        for mapping, cls, register_fn in (
            (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, OsscarConfig, auto.register_quantization_config),
            (auto.AUTO_QUANTIZER_MAPPING, OsscarHfQuantizer, auto.register_quantizer),
        ):
            current = mapping.get(QUANT_METHOD)
            if current is cls:
                continue
            if current is None:
                register_fn(QUANT_METHOD)(cls)
            elif (current.__module__, current.__qualname__) == (cls.__module__, cls.__qualname__):
                mapping[QUANT_METHOD] = cls  # our own class, from a re-imported module
            else:
                raise OsscarError(
                    f"transformers already has {current.__module__}.{current.__qualname__} registered under "
                    f"quant_method={QUANT_METHOD!r}; osscar_hf cannot register {cls.__qualname__}"
                )


# Importing this module first (before transformers' quantizer registry) must register too: see
# osscar_hf.integrations.register, which defers to this call while the module is half-run.
register_quantizer()
