"""CNN architectures as data: where the residual blocks are, and which convolutions consume and produce their inner
channels (see ``docs/vision.md``).

A block is the unit, as a decoder block is for a language model. Its *channel problems* are solved in series, in
the order given: each is one layer-wise problem (ALGORITHM.md section 2) whose consumer is a convolution, whose
structures are that convolution's input channels (a group of ``k*k`` columns of its unfolded input), and whose
producers are the modules whose output channels make those inputs (convolutions, their batch norms, a depthwise
convolution between them). The channels the residual path carries are never a structure.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..errors import UnsupportedModelError
from .spec import get_submodule, set_submodule

__all__ = [
    "BlockList", "ChannelProblem", "MOBILENET_V2", "RESNET", "VisionSpec", "get_vision_spec", "image_channels",
    "is_vision_model", "register_vision_architecture", "vision_model_types",
]


@dataclass(frozen=True)
class ChannelProblem:
    """One consumer and the producers of its input channels, paths from the block.

    ``consumer``: a module refit on the kept input channels (an ``nn.Conv2d`` with ``groups=1``, an ``nn.Linear``).
    ``producers``: modules sliced with them (``nn.Conv2d``: their output channels, or all channels of a depthwise one;
    ``nn.BatchNorm2d``; ``nn.Linear``). The operations on each type are registered in :mod:`osscar_hf.channel_surgery`.
    """

    consumer: str
    producers: tuple[str, ...]


@dataclass(frozen=True)
class VisionSpec:
    """Where a CNN family keeps its residual blocks (``blocks``: dotted paths from the model, ``*`` standing for
    every child of a container, in order) and the channel problems of each kind of block (``layouts``: the block's
    class name -> its problems, in the order they are solved)."""

    name: str
    model_types: tuple[str, ...]
    blocks: tuple[str, ...]
    layouts: dict[str, tuple[ChannelProblem, ...]]
    # A wrapper's model type (transformers' ``timm_wrapper``) holds many families: the spec is for a model whose
    # module at ``wrapped`` (a dotted path) is of a class named in ``wrapped_classes`` (empty: any model of the type).
    wrapped: str = ""
    wrapped_classes: tuple[str, ...] = ()
    # Block class -> its submodules that must be absent or ``nn.Identity`` for its layout to hold: optional modules
    # on the inner channels that the layout does not slice (timm's squeeze-excitation ``se``, anti-aliasing ``aa``).
    identities: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def describes(self, model: nn.Module) -> bool:
        """Whether ``model`` is of the family this spec describes (always, unless the spec is for a wrapper)."""
        if not self.wrapped_classes:
            return True
        try:
            return type(get_submodule(model, self.wrapped)).__name__ in self.wrapped_classes
        except AttributeError:
            return False

    def block_paths(self, model: nn.Module) -> list[str]:
        """Every block's dotted path in ``model``, in the order the forward runs them."""
        return [path for pattern in self.blocks for path in _expand(model, pattern)]

    def layout(self, block: nn.Module) -> tuple[ChannelProblem, ...]:
        """The channel problems of ``block`` (its class must have a layout)."""
        name = type(block).__name__
        if name not in self.layouts:
            raise UnsupportedModelError(
                f"architecture spec {self.name!r} has no channel layout for a {name}; it knows {sorted(self.layouts)}")
        return self.layouts[name]

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`~osscar_hf.errors.UnsupportedModelError` unless every block has a layout and every path it
        names is a module the surgery can slice: checked before any work, so the model is never left half pruned."""
        found: list[str] = []
        try:
            paths = self.block_paths(model)
        except AttributeError as exc:
            raise UnsupportedModelError(f"architecture spec {self.name!r} does not describe this "
                                        f"{type(model).__name__}: {exc}") from None
        if not paths:
            found.append(f"residual blocks at {list(self.blocks)}")
        for path in paths:
            block = get_submodule(model, path)
            if type(block).__name__ not in self.layouts:
                found.append(f"a channel layout for {path} (a {type(block).__name__})")
                continue
            for problem in self.layouts[type(block).__name__]:
                found += [f"{path}.{what}" for what in _problem_faults(block, problem)]
            found += [f"{path}.{what}" for what in _identity_faults(block, self.identities)]
        if found:
            more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
            raise UnsupportedModelError(
                f"architecture spec {self.name!r} cannot prune this {type(model).__name__}: it needs "
                f"{'; '.join(found[:3])}{more}")


def _expand(root: nn.Module, pattern: str) -> Iterator[str]:
    head, star, tail = pattern.partition("*")
    if not star:
        get_submodule(root, pattern)  # raises AttributeError when absent
        yield pattern
        return
    prefix = head.rstrip(".")
    container = get_submodule(root, prefix)
    for name, _ in container.named_children():
        path = f"{prefix}.{name}" if prefix else name
        rest = tail.lstrip(".")
        yield from (_expand(root, f"{path}.{rest}") if rest else iter([path]))


def _problem_faults(block: nn.Module, problem: ChannelProblem) -> list[str]:
    """What is wrong with ``problem`` in ``block`` (empty when the surgery can slice it): every module must be of a
    type with registered operations (:mod:`osscar_hf.channel_surgery`) that accept it, with matching widths."""
    from ..channel_surgery import consumer_ops, producer_ops
    from ..errors import SurgeryError

    try:
        consumer = get_submodule(block, problem.consumer)
        ops = consumer_ops(consumer)
    except (AttributeError, SurgeryError) as exc:
        return [f"{problem.consumer} to be a consumer ({exc})"]
    fault = ops.fault(consumer)
    if fault is not None:
        return [f"{problem.consumer} to be a consumer ({fault})"]
    width, faults = ops.width(consumer), []
    for path in problem.producers:
        try:
            module = get_submodule(block, path)
            producer = producer_ops(module)
        except (AttributeError, SurgeryError) as exc:
            faults.append(f"{path} to be a producer ({exc})")
            continue
        fault = producer.fault(module)
        if fault is not None:
            faults.append(f"{path} to be a producer ({fault})")
        elif producer.width(module) != width:
            faults.append(f"{path} to have {width} output channels (it has {producer.width(module)})")
    return faults


def _identity_faults(block: nn.Module, identities: dict[str, tuple[str, ...]]) -> list[str]:
    faults = []
    for name in identities.get(type(block).__name__, ()):
        module = getattr(block, name, None)
        if module is not None and not isinstance(module, nn.Identity):
            faults.append(f"{name} to be absent or nn.Identity (it is a {type(module).__name__}, which acts on the "
                          "inner channels and is not sliced with them)")
    return faults


class BlockList:
    """A model's residual blocks as a list that can also be assigned to (what the block-input capture needs), when
    they live in several containers (a ResNet's stages)."""

    def __init__(self, model: nn.Module, paths: list[str]) -> None:
        self.model = model
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> nn.Module:
        return get_submodule(self.model, self.paths[index])

    def __setitem__(self, index: int, module: nn.Module) -> None:
        set_submodule(self.model, self.paths[index], module)

    def __iter__(self) -> Iterator[nn.Module]:
        return (self[i] for i in range(len(self)))


# transformers' ResNet: a bottleneck block is conv1 (1x1) -> conv2 (3x3) -> conv3 (1x1), each with a batch norm; a
# basic block two 3x3 convolutions. The first problem of a bottleneck: conv2 consumes conv1's channels (groups of 9
# columns); the second: conv3 consumes conv2's (single columns), after the first is applied.
RESNET = VisionSpec(
    name="resnet",
    model_types=("resnet",),
    blocks=("resnet.encoder.stages.*.layers.*",),
    layouts={
        "ResNetBottleNeckLayer": (
            ChannelProblem("layer.1.convolution", ("layer.0.convolution", "layer.0.normalization")),
            ChannelProblem("layer.2.convolution", ("layer.1.convolution", "layer.1.normalization")),
        ),
        "ResNetBasicLayer": (
            ChannelProblem("layer.1.convolution", ("layer.0.convolution", "layer.0.normalization")),
        ),
    },
)

# transformers' MobileNetV2: an inverted residual expands (1x1), filters each channel (3x3 depthwise) and projects
# (1x1). The expansion channels are the structures: the projection consumes them; the expansion conv, the depthwise
# conv and both their batch norms are sliced with them.
MOBILENET_V2 = VisionSpec(
    name="mobilenet_v2",
    model_types=("mobilenet_v2",),
    blocks=("mobilenet_v2.layer.*",),
    layouts={
        "MobileNetV2InvertedResidual": (
            ChannelProblem("reduce_1x1.convolution", ("expand_1x1.convolution", "expand_1x1.normalization",
                                                      "conv_3x3.convolution", "conv_3x3.normalization")),
        ),
    },
)

_VISION: dict[str, list[VisionSpec]] = {}


def register_vision_architecture(spec: VisionSpec, *, overwrite: bool = False) -> None:
    """Add ``spec`` for each of its model types (a clear error if one is taken, unless ``overwrite``). Several specs
    can share a wrapper's model type when each names the classes it wraps (``wrapped_classes``), all different."""
    if not isinstance(spec, VisionSpec):
        raise TypeError(f"register_vision_architecture needs a VisionSpec, got {type(spec).__name__}")
    for model_type in spec.model_types:
        clash = [old for old in _VISION.get(model_type, []) if _overlap(old, spec)]
        if clash and not overwrite:
            raise ValueError(f"model_type {model_type!r} is already registered (spec {clash[0].name!r})")
    for model_type in spec.model_types:
        kept = [old for old in _VISION.get(model_type, []) if not _overlap(old, spec)]
        _VISION[model_type] = kept + [spec]


def _overlap(a: VisionSpec, b: VisionSpec) -> bool:
    return not a.wrapped_classes or not b.wrapped_classes or bool(set(a.wrapped_classes) & set(b.wrapped_classes))


def vision_model_types() -> list[str]:
    return sorted(_VISION)


def is_vision_model(model_or_config: Any) -> bool:
    """Whether ``model_or_config``'s ``model_type`` has a registered :class:`VisionSpec` (a wrapper's type, such as
    ``timm_wrapper``, also when it wraps a network no spec describes: :func:`get_vision_spec` then says so)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) in _VISION


def get_vision_spec(model_or_config: Any) -> VisionSpec:
    """The spec of a model (or of the model a config builds: for a wrapper's config, its skeleton on meta)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _VISION:
        raise UnsupportedModelError(f"osscar_hf has no CNN spec for model_type {model_type!r}; CNN model types: "
                                    f"{', '.join(vision_model_types())}")
    specs = _VISION[model_type]
    if len(specs) == 1 and not specs[0].wrapped_classes:
        return specs[0]
    model = model_or_config if isinstance(model_or_config, nn.Module) else _skeleton(config)
    for spec in specs:
        if spec.describes(model):
            return spec
    wrapped = {spec.wrapped for spec in specs}
    found = [type(get_submodule(model, path)).__name__ for path in wrapped if _has(model, path)]
    known = sorted({name for spec in specs for name in spec.wrapped_classes})
    raise UnsupportedModelError(f"osscar_hf has no CNN spec for this {model_type} model (it wraps a "
                                f"{' / '.join(found) or 'network it cannot find'}); it prunes {model_type} models "
                                f"wrapping {', '.join(known)}")


def _has(model: nn.Module, path: str) -> bool:
    try:
        get_submodule(model, path)
    except AttributeError:
        return False
    return True


def _skeleton(config: Any) -> nn.Module:
    import torch
    from transformers import AutoModelForImageClassification

    with torch.device("meta"):
        return AutoModelForImageClassification.from_config(config)


def image_channels(model: nn.Module) -> int:
    """The channels per pixel ``model`` takes: its config's ``num_channels``, else (a timm model's
    ``TimmWrapperConfig`` has no such field) the input channels of its first convolution."""
    channels = getattr(model.config, "num_channels", None)
    if channels is not None:
        return int(channels)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise UnsupportedModelError(f"cannot tell the image channels of this {type(model).__name__}: its config has "
                                    "no num_channels and it has no nn.Conv2d")
    return int(first.in_channels)


register_vision_architecture(RESNET)
register_vision_architecture(MOBILENET_V2)
