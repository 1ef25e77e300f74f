"""Statistics of the consumers' inputs, accumulated by forward pre-hooks while a block runs on calibration data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from ..methods import GRAM, MOMENTS, LayerStatistics
from ..solver import accumulate_cross_gram, accumulate_gram, new_gram

__all__ = ["ExpertStatistics", "InputStatistics", "expert_inputs", "gated_input_hooks", "input_hooks",
           "routed_input_hooks"]


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


def statistics_tensors(stats: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Copies of every part's Gram and counts as named tensors on ``device`` (to keep them, in memory or in a file);
    only Gram statistics can be kept (:func:`statistics_from_tensors` gives them back)."""
    out: dict[str, torch.Tensor] = {}
    for part, st in stats.items():
        if not isinstance(st, InputStatistics) or st.gram is None or st.sum is not None or st.cross_gram is not None:
            raise ValueError(f"only a Gram matrix can be kept for later, not the statistics of {part!r}")
        out[f"{part}.gram"] = st.gram.to(device, copy=True, memory_format=torch.contiguous_format)
        out[f"{part}.counts"] = torch.tensor([st.count, st.tokens], dtype=torch.int64, device=device)
    return out


def statistics_from_tensors(tensors: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, InputStatistics]:
    """The :class:`InputStatistics` that :func:`statistics_tensors` kept, on ``device``, by part."""
    stats: dict[str, InputStatistics] = {}
    for name in sorted(k for k in tensors if k.endswith(".gram")):
        part = name.removesuffix(".gram")
        gram = tensors[name]
        st = InputStatistics(gram.shape[0], torch.device(device), frozenset({GRAM}), cross=False)
        st.gram.copy_(gram)
        st.count, st.tokens = (int(v) for v in tensors[f"{part}.counts"].tolist())
        stats[part] = st
    return stats


class ExpertStatistics:
    """One :class:`InputStatistics` per expert of a mixture of experts, each fed only the tokens routed to it."""

    def __init__(self, experts: int, p: int, device: torch.device, needs: frozenset[str]) -> None:
        self.experts = [InputStatistics(p, device, needs, False) for _ in range(experts)]
        self.cross_gram = None  # no dense targets: the dense stream routes its tokens elsewhere

    def add(self, expert: int, x: torch.Tensor) -> None:
        self.experts[expert].add(x)

    def take(self, expert: int) -> LayerStatistics:
        return self.experts[expert].take()


def expert_inputs(module: nn.Module, producer: str, hidden: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(e, x_e)`` for every expert ``e`` that gets a token: ``x_e`` is the input of its down projection for those
    tokens, ``act(gate) * up``, each row scaled by the token's routing weight for ``e`` (the expert's output joins the
    residual stream scaled by it, so the reconstruction error that matters is the scaled one)."""
    weights = getattr(module, producer)
    gate = getattr(module, "_apply_gate", None)
    for e in range(weights.shape[0]):
        position, token = torch.where(top_k_index.T == e)
        if token.numel() == 0:
            continue
        projected = nn.functional.linear(hidden[token], weights[e])
        if gate is not None:
            x = gate(projected)
        else:
            first, second = projected.chunk(2, dim=-1)
            x = module.act_fn(first) * second
        yield e, x * top_k_weights[token, position].unsqueeze(-1).to(x.dtype)


@contextmanager
def routed_input_hooks(modules: dict[str, tuple[nn.Module, str]],
                       callback: Callable[[str, int, torch.Tensor], None]) -> Iterator[None]:
    """Forward pre-hooks on experts modules (``{name: (module, name of its [gate | up] parameter)}``) that hand every
    routed expert's down-projection input (:func:`expert_inputs`) to ``callback(name, expert, input)``."""

    def make_hook(name: str, producer: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights")[len(args):]]
            hidden, index, weights = (v.detach() for v in values[:3])
            for e, x in expert_inputs(module, producer, hidden, index, weights):
                callback(name, e, x)

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name, producer), with_kwargs=True)
               for name, (module, producer) in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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


@contextmanager
def gated_input_hooks(modules: dict[str, tuple[nn.Module, nn.Module]],
                      callback: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Hooks on consumers whose output joins the residual stream scaled per token by ``sigmoid(gate(x))`` (a shared
    expert's down projection, ``{name: (consumer, gate)}``): each batch's consumer input, every token's row scaled by
    its gate, goes to ``callback(name, input)``, whichever of the two modules runs first."""
    pending: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}

    def arrived(name: str, key: str, value: torch.Tensor) -> None:
        seen = pending[name]
        seen[key] = value
        if len(seen) == 2:
            x, gate = seen.pop("input"), seen.pop("gate")
            callback(name, x * torch.sigmoid(gate).reshape(*x.shape[:-1], 1).to(x.dtype))

    def input_hook(name: str) -> Callable[..., None]:
        return lambda _module, args: arrived(name, "input", args[0].detach())

    def gate_hook(name: str) -> Callable[..., None]:
        return lambda _module, _args, output: arrived(name, "gate", output.detach())

    handles = [handle for name, (consumer, gate) in modules.items()
               for handle in (consumer.register_forward_pre_hook(input_hook(name)),
                              gate.register_forward_hook(gate_hook(name)))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
