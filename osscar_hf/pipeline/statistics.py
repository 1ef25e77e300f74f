"""Statistics of the consumers' inputs, accumulated by forward pre-hooks while a block runs on calibration data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from ..methods import GRAM, MOMENTS, LayerStatistics
from ..solver import accumulate_cross_gram, accumulate_gram, new_gram

__all__ = ["InputStatistics", "input_hooks"]


class InputStatistics:
    """Running statistics of one consumer's inputs: what a method asks for (:data:`~osscar_hf.methods.GRAM`,
    :data:`~osscar_hf.methods.MOMENTS`), and with ``cross`` the dense-target cross-Gram."""

    def __init__(self, p: int, device: torch.device, needs: frozenset[str], cross: bool) -> None:
        self.gram = new_gram(p, device) if GRAM in needs else None
        self.cross_gram = new_gram(p, device) if cross else None
        self.sum = torch.zeros(p, dtype=torch.float64, device=device) if MOMENTS in needs else None
        self.sum_square = torch.zeros(p, dtype=torch.float64, device=device) if MOMENTS in needs else None
        self.count = 0
        self.count_cross = 0
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold a batch of inputs ``(..., p)`` in."""
        if self.gram is not None:
            self.count = accumulate_gram(self.gram, self.count, x)
        if self.sum is not None:
            rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
            self.sum.add_(rows.sum(0))
            self.sum_square.add_(rows.pow(2).sum(0))
        self.tokens += x.numel() // x.shape[-1]

    def add_cross(self, pruned: torch.Tensor, dense: torch.Tensor) -> None:
        """Fold the pruned and dense streams' inputs of one batch into the cross-Gram."""
        self.count_cross = accumulate_cross_gram(self.cross_gram, self.count_cross, pruned, dense)

    def take(self) -> LayerStatistics:
        """The accumulated statistics, handed over (this object keeps no reference to the big tensors)."""
        stats = LayerStatistics(gram=self.gram, cross_gram=self.cross_gram, tokens=self.tokens)
        if self.sum is not None and self.tokens:
            stats.mean = self.sum / self.tokens
            stats.mean_square = self.sum_square / self.tokens
        self.gram = self.cross_gram = self.sum = self.sum_square = None
        return stats


@contextmanager
def input_hooks(modules: dict[str, nn.Module], callback: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Forward pre-hooks that hand each named module's input to ``callback(name, input)``."""

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            callback(name, args[0].detach())

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
