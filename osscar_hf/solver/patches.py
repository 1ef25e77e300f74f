"""The rows of a convolution's layer-wise problem: its unfolded input (im2col), one row per output position."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["conv_rows"]


def conv_rows(x: torch.Tensor, kernel_size: tuple[int, int], *, stride: tuple[int, int] = (1, 1),
              padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """``x`` (N, C, H, W) as the ``(N * L, C * kh * kw)`` matrix X with ``conv(x) = X @ weight.reshape(out, -1).T``
    (one row per image and output position; columns channel-major, so input channel ``c`` is the contiguous group of
    columns ``[c * kh * kw, (c + 1) * kh * kw)``). A 1x1 convolution with stride 1 is a view-free permute of ``x``."""
    if x.dim() != 4:
        raise ValueError(f"a convolution's input must be (N, C, H, W), got shape {tuple(x.shape)}")
    if tuple(kernel_size) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])
