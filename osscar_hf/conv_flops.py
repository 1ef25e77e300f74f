"""Multiply-adds of a CNN's forward on one image, counted from its convolutions and linears (what channel pruning
changes; batch norms, activations and pooling are left out)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["count_multiply_adds", "probe_pixels"]


def probe_pixels(model: nn.Module, pixel_values: torch.Tensor | None) -> torch.Tensor:
    """One image to count on: the first calibration image, or zeros at the config's ``image_size`` (224 without;
    a timm model's: its ``pretrained_cfg`` input size)."""
    from .arch.vision import image_channels

    if pixel_values is not None:
        return pixel_values[:1]
    size = int(getattr(model.config, "image_size", 0) or _timm_input_size(model) or 224)
    return torch.zeros(1, image_channels(model), size, size)


def _timm_input_size(model: nn.Module) -> int | None:
    cfg = getattr(getattr(model, "timm_model", None), "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    return int(size[-1]) if size else None


@torch.no_grad()
def count_multiply_adds(model: nn.Module, pixels: torch.Tensor) -> int:
    """Multiply-adds of ``model``'s convolutions and linears on ``pixels`` (one image), by forward hooks."""
    total = 0

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output[0].numel() * per_output
        else:
            total += output[0].numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        device = next(model.parameters()).device
        model(pixel_values=pixels.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return total
