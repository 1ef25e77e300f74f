"""Tiny random timm CNNs wrapped in transformers' ``TimmWrapperForImageClassification`` (tests of CNN channel
pruning of timm models; import only after ``pytest.importorskip("timm")``).

The ResNets are timm's ``resnet50`` / ``resnet18`` with small ``model_args``; the EfficientNet-family networks are
small variants registered in timm's model registry here (in this process only), since their width multipliers are
not ``model_args``: ``osscar_tiny_mobilenetv2`` (``mobilenetv2_100`` at a quarter of the width),
``osscar_tiny_efficientnet_lite`` (``tf_efficientnet_lite0`` at a quarter of the width, TF "same" padding, so its
stride-2 depthwise convolutions are timm's ``Conv2dSame``), ``osscar_tiny_efficientnet_se`` (``efficientnet_b0``,
which has squeeze-excitation: refused)."""

from __future__ import annotations

import torch.nn as nn
from timm.models import register_model
from timm.models._efficientnet_builder import BN_EPS_TF_DEFAULT
from timm.models.efficientnet import _gen_efficientnet, _gen_efficientnet_lite, _gen_mobilenet_v2
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

from tests.vision_models import randomize

TIMM_KINDS = ("timm_bottleneck", "timm_basic", "timm_mobilenetv2", "timm_efficientnet_lite")
_RESNET_ARGS = {"layers": [1, 1, 1, 1], "channels": [8, 16, 16, 32], "stem_width": 8}
ARCHITECTURES = {
    "timm_bottleneck": ("resnet50", _RESNET_ARGS),
    "timm_basic": ("resnet18", _RESNET_ARGS),
    "timm_mobilenetv2": ("osscar_tiny_mobilenetv2", None),
    "timm_efficientnet_lite": ("osscar_tiny_efficientnet_lite", None),
    "timm_efficientnet_se": ("osscar_tiny_efficientnet_se", None),
}


@register_model
def osscar_tiny_mobilenetv2(pretrained: bool = False, **kwargs) -> nn.Module:
    return _gen_mobilenet_v2("mobilenetv2_100", 0.25, depth_multiplier=0.5, pretrained=pretrained, **kwargs)


@register_model
def osscar_tiny_efficientnet_lite(pretrained: bool = False, **kwargs) -> nn.Module:
    kwargs.setdefault("bn_eps", BN_EPS_TF_DEFAULT)
    kwargs.setdefault("pad_type", "same")
    return _gen_efficientnet_lite("tf_efficientnet_lite0", 0.25, 0.5, pretrained=pretrained, **kwargs)


@register_model
def osscar_tiny_efficientnet_se(pretrained: bool = False, **kwargs) -> nn.Module:
    return _gen_efficientnet("efficientnet_b0", 0.25, 0.5, pretrained=pretrained, **kwargs)


def make_timm(kind: str, seed: int = 0) -> TimmWrapperForImageClassification:
    """A tiny random timm CNN of ``kind`` in transformers' wrapper, in eval mode (random weights as in
    :func:`tests.vision_models.make_cnn`)."""
    import torch

    torch.manual_seed(seed)
    architecture, model_args = ARCHITECTURES[kind]
    config = TimmWrapperConfig(architecture=architecture, model_args=model_args, num_labels=5)
    return randomize(TimmWrapperForImageClassification(config), seed)
