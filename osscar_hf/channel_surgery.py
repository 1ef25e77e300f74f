"""Channel surgery, as operations registered per module type: what a consumer's inputs are as rows of its
layer-wise problem, its weight as the problem's matrix, how its input channels are replaced by the kept (refit)
ones, and how a producer keeps only some output channels.

``nn.Conv2d`` (its input as unfolded patches, one row per output position), ``nn.Linear`` (one row per token),
``nn.BatchNorm2d`` (a producer only) are registered here; a new module type (a timm layer) is one
:func:`register_consumer` / :func:`register_producer` call. Every index is validated before a module changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import SurgeryError
from .solver import conv_rows
from .surgery import check_indices, slice_linear_inputs, slice_linear_outputs

__all__ = ["ConsumerOps", "ProducerOps", "consumer_ops", "keep_input_channels", "keep_output_channels",
           "producer_ops", "register_consumer", "register_producer"]


@dataclass(frozen=True)
class ConsumerOps:
    """How the pipeline sees one kind of consumer: ``rows(module, x)`` its input ``x`` as the rows of X (one row per
    token or output position), ``matrix(module)`` its weight as the (out, p) matrix with ``output = X @ matrix.T``,
    ``group_size(module)`` the columns of one input channel, ``write(module, kept_channels, matrix)`` its new
    weight from the problem's (out, kept columns) answer (None: its own kept columns), ``width(module)`` its input
    channels, ``fault(module)`` why this module cannot be a consumer (None when it can)."""

    rows: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    matrix: Callable[[nn.Module], torch.Tensor]
    group_size: Callable[[nn.Module], int]
    write: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], None]
    width: Callable[[nn.Module], int]
    fault: Callable[[nn.Module], str | None] = lambda _module: None


@dataclass(frozen=True)
class ProducerOps:
    """How a producer keeps some output channels (``keep(module, channels)``), how many it has (``width``) and why
    it cannot be sliced (``fault``, None when it can)."""

    keep: Callable[[nn.Module, torch.Tensor], None]
    width: Callable[[nn.Module], int]
    fault: Callable[[nn.Module], str | None] = lambda _module: None


_CONSUMERS: dict[type[nn.Module], ConsumerOps] = {}
_PRODUCERS: dict[type[nn.Module], ProducerOps] = {}


def register_consumer(module_type: type[nn.Module], ops: ConsumerOps) -> None:
    _CONSUMERS[module_type] = ops


def register_producer(module_type: type[nn.Module], ops: ProducerOps) -> None:
    _PRODUCERS[module_type] = ops


def _lookup(table: dict[type[nn.Module], object], module: nn.Module, role: str) -> object:
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    raise SurgeryError(f"no {role} operations are registered for a {type(module).__name__}; registered: "
                       f"{sorted(t.__name__ for t in table)}")


def consumer_ops(module: nn.Module) -> ConsumerOps:
    return _lookup(_CONSUMERS, module, "consumer")  # type: ignore[return-value]


def producer_ops(module: nn.Module) -> ProducerOps:
    return _lookup(_PRODUCERS, module, "producer")  # type: ignore[return-value]


def keep_output_channels(module: nn.Module, channels: torch.Tensor) -> None:
    """Keep output channels ``channels`` (sorted, distinct) of a producer."""
    producer_ops(module).keep(module, channels)


def keep_input_channels(module: nn.Module, channels: torch.Tensor, matrix: torch.Tensor | None = None) -> None:
    """Keep input channels ``channels`` of a consumer, with the problem's refit ``matrix`` as its new weight."""
    consumer_ops(module).write(module, channels, matrix)


# ----------------------------------------------------------------------------------------------- nn.Conv2d
def _parameter(old: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.to(old).contiguous(), old.requires_grad)


def _conv_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv_rows(x, conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)


def _conv_write(conv: nn.Conv2d, channels: torch.Tensor, matrix: torch.Tensor | None) -> None:
    idx = check_indices(channels, conv.in_channels, f"input channels of {conv}").to(conv.weight.device)
    kh, kw = conv.kernel_size
    if matrix is not None and tuple(matrix.shape) != (conv.out_channels, idx.numel() * kh * kw):
        raise SurgeryError(f"refit weight of {conv} has shape {tuple(matrix.shape)}, expected "
                           f"{(conv.out_channels, idx.numel() * kh * kw)}")
    with torch.no_grad():
        new = (conv.weight.index_select(1, idx) if matrix is None
               else matrix.reshape(conv.out_channels, idx.numel(), kh, kw))
        conv.weight = _parameter(conv.weight, new)
    conv.in_channels = int(idx.numel())


def _conv_consumer_fault(conv: nn.Conv2d) -> str | None:
    if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return "an nn.Conv2d consumer needs groups=1 and numeric zero padding"
    if type(conv).forward is not nn.Conv2d.forward:  # e.g. timm's Conv2dSame, which pads its input in forward
        return (f"a {type(conv).__name__} has its own forward, so its unfolded input is not that of an nn.Conv2d; "
                "register its consumer operations (channel_surgery.register_consumer)")
    return None


def _conv_producer_fault(conv: nn.Conv2d) -> str | None:
    if conv.groups != 1 and not conv.groups == conv.in_channels == conv.out_channels:
        return "an nn.Conv2d producer needs groups=1 or a depthwise convolution"
    return None


def _conv_keep_outputs(conv: nn.Conv2d, channels: torch.Tensor) -> None:
    depthwise = conv.groups > 1
    if depthwise and not conv.groups == conv.in_channels == conv.out_channels:
        raise SurgeryError(f"{conv}: only groups=1 or depthwise convolutions can lose output channels")
    idx = check_indices(channels, conv.out_channels, f"output channels of {conv}").to(conv.weight.device)
    with torch.no_grad():
        conv.weight = _parameter(conv.weight, conv.weight.index_select(0, idx))
        if conv.bias is not None:
            conv.bias = _parameter(conv.bias, conv.bias.index_select(0, idx))
    conv.out_channels = int(idx.numel())
    if depthwise:  # each channel is its own group: the input channels go with it
        conv.in_channels = conv.groups = int(idx.numel())


def _batch_norm_keep(norm: nn.BatchNorm2d, channels: torch.Tensor) -> None:
    device = norm.running_mean.device if norm.running_mean is not None else norm.weight.device
    idx = check_indices(channels, norm.num_features, f"channels of {norm}").to(device)
    with torch.no_grad():
        for name in ("weight", "bias"):
            old = getattr(norm, name)
            if old is not None:
                setattr(norm, name, _parameter(old, old.index_select(0, idx)))
        for name in ("running_mean", "running_var"):
            old = getattr(norm, name)
            if old is not None:
                setattr(norm, name, old.index_select(0, idx).contiguous())
    norm.num_features = int(idx.numel())


register_consumer(nn.Conv2d, ConsumerOps(
    rows=_conv_rows,
    matrix=lambda conv: conv.weight.reshape(conv.out_channels, -1),
    group_size=lambda conv: conv.kernel_size[0] * conv.kernel_size[1],
    write=_conv_write,
    width=lambda conv: conv.in_channels,
    fault=_conv_consumer_fault,
))
register_producer(nn.Conv2d, ProducerOps(keep=_conv_keep_outputs, width=lambda conv: conv.out_channels,
                                         fault=_conv_producer_fault))
register_producer(nn.BatchNorm2d, ProducerOps(keep=_batch_norm_keep, width=lambda norm: norm.num_features))
register_consumer(nn.Linear, ConsumerOps(
    rows=lambda linear, x: x.reshape(-1, x.shape[-1]),
    matrix=lambda linear: linear.weight,
    group_size=lambda linear: 1,
    write=slice_linear_inputs,
    width=lambda linear: linear.in_features,
))
register_producer(nn.Linear, ProducerOps(keep=slice_linear_outputs, width=lambda linear: linear.out_features))

