"""timm CNNs through transformers' ``TimmWrapperForImageClassification`` (``model_type`` ``timm_wrapper``, the timm
network at ``timm_model``), as data like transformers' own CNNs (:mod:`.vision`, ``docs/vision.md``).

Every timm model shares the wrapper's model type, so each spec names the timm network class it describes
(``wrapped_classes``). timm is never imported here: blocks are matched by class name.

- timm's ``ResNet`` (``resnet18``, ``resnet50``, ...): a ``Bottleneck`` is conv1 (1x1) -> conv2 (3x3) -> conv3
  (1x1), each with a batch norm, a ``BasicBlock`` two 3x3 convolutions; the problems are transformers' ResNet's.
  A grouped conv2 (ResNeXt) is refused by the consumer check; an anti-aliasing ``aa`` on the inner channels too.
- timm's ``EfficientNet`` (``mobilenetv2_*``, ``tf_efficientnet_lite*``, ``efficientnet_lite*``): an
  ``InvertedResidual`` is conv_pw (1x1 expansion) -> bn1 -> conv_dw (depthwise) -> bn2 -> conv_pwl (1x1
  projection) -> bn3; the expansion channels are the structures (consumer conv_pwl; conv_pw, bn1, conv_dw and bn2
  sliced). A squeeze-excitation ``se`` (EfficientNet-B*, not the Lite variants) gates those channels by all of them,
  so the projection's inputs would change when one is removed: refused. A ``DepthwiseSeparableConv`` (the first
  block) has no inner width of its own (its depthwise channels are the stem's output channels, which the residual
  path carries), so it has no problem and is left as it is.
"""

from __future__ import annotations

from .vision import ChannelProblem, VisionSpec, register_vision_architecture

__all__ = ["TIMM_EFFICIENTNET", "TIMM_RESNET"]

TIMM_RESNET = VisionSpec(
    name="timm_resnet",
    model_types=("timm_wrapper",),
    blocks=tuple(f"timm_model.layer{i}.*" for i in range(1, 5)),
    layouts={
        "Bottleneck": (ChannelProblem("conv2", ("conv1", "bn1")), ChannelProblem("conv3", ("conv2", "bn2"))),
        "BasicBlock": (ChannelProblem("conv2", ("conv1", "bn1")),),
    },
    wrapped="timm_model",
    wrapped_classes=("ResNet",),
    identities={"Bottleneck": ("aa",), "BasicBlock": ("aa",)},
)

TIMM_EFFICIENTNET = VisionSpec(
    name="timm_efficientnet",
    model_types=("timm_wrapper",),
    blocks=("timm_model.blocks.*.*",),
    layouts={
        "InvertedResidual": (ChannelProblem("conv_pwl", ("conv_pw", "bn1", "conv_dw", "bn2")),),
        "DepthwiseSeparableConv": (),
    },
    wrapped="timm_model",
    wrapped_classes=("EfficientNet",),
    identities={"InvertedResidual": ("se", "aa")},
)

register_vision_architecture(TIMM_RESNET)
register_vision_architecture(TIMM_EFFICIENTNET)
