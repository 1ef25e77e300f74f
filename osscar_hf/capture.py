"""Capture every decoder block's inputs for the calibration windows, without running any block.

Each block is temporarily replaced by a recorder that keeps its positional and keyword arguments (masks,
position ids, rotary embeddings, cache flags: whatever the model passes, so new keyword arguments keep
working) and passes the hidden states through unchanged. The last recorder stops the forward with a
private exception, so neither the blocks nor the LM head ever run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:  # pragma: no cover
    from .activations import ActivationSpace, ActivationStore


class _CaptureDone(Exception):
    """Raised by the last recorder to stop the model's forward (never escapes this module)."""


class _Recorder(nn.Module):
    def __init__(self, block: nn.Module, index: int, sink: list[tuple[tuple, dict]], last: bool) -> None:
        super().__init__()
        self.block = block
        self.index = index
        self.sink = sink
        self.last = last

    def __getattr__(self, name: str) -> Any:  # models may read attributes of their layers
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.sink.append((args, kwargs))
        if self.last:
            raise _CaptureDone
        return args[0] if args else kwargs["hidden_states"]


@dataclass
class CapturedInputs:
    """Calibration inputs of every block, batch by batch.

    ``hidden[b]`` is the hidden state entering block 0 for batch ``b`` (a list, or an
    :class:`~osscar_hf.activations.ActivationStore` when captured into an activation space); ``kwargs[i][b]``
    are the keyword arguments (and any extra positional ones, under ``"__args__"``) the model passes to block
    ``i``, always in memory (masks, position ids, rotary tables: small next to the hidden states).
    Tensors shared between blocks (masks, rotary tables) are shared here too, not copied.
    """

    hidden: list[torch.Tensor] | ActivationStore
    kwargs: list[list[dict[str, Any]]]


def move_to(obj: Any, device: torch.device | str, memo: dict[int, Any] | None = None) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``; tensors shared stay shared."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, dict):
        return {k: move_to(v, device, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        moved = [move_to(v, device, memo) for v in obj]
        return type(obj)(moved) if not hasattr(obj, "_fields") else type(obj)(*moved)
    return obj


# Keyword-argument tensors at least this big are shared between batches when equal (see _share_equal).
SHARE_MIN_BYTES = 1 << 20


def _share_equal(obj: Any, seen: dict[tuple, list[torch.Tensor]]) -> Any:
    """``obj`` with every big tensor replaced by an equal one kept for an earlier batch, when there is one.

    Eager attention passes a materialised (batch x 1 x seq x seq) mask with every batch, the same in every batch
    of equal shape when there is no padding: 64 MiB per batch of 8 x 2048 tokens in 16 bits, kept once instead
    of once per batch.
    """
    if isinstance(obj, torch.Tensor):
        if obj.numel() * obj.element_size() < SHARE_MIN_BYTES:
            return obj
        key = (obj.shape, obj.dtype, obj.device, obj.stride())
        kept = seen.setdefault(key, [])
        for other in kept:
            if other is obj or torch.equal(other, obj):
                return other
        kept.append(obj)
        return obj
    if isinstance(obj, dict):
        return {k: _share_equal(v, seen) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        shared = [_share_equal(v, seen) for v in obj]
        return type(obj)(shared) if not hasattr(obj, "_fields") else type(obj)(*shared)
    return obj


def _token_inputs(batch: torch.Tensor) -> dict[str, Any]:
    return {"input_ids": batch, "use_cache": False}


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    *,
    batch_size: int,
    storage_device: torch.device | str = "cpu",
    activations: ActivationSpace | None = None,
    model_inputs: Callable[[torch.Tensor], dict[str, Any]] | None = None,
) -> CapturedInputs:
    """Run ``model`` on ``input_ids`` (windows x seq_len) up to the first block and record each block's inputs.

    The model runs where its embeddings are; captured tensors are kept on ``storage_device``. With
    ``activations``, block 0's hidden states go batch by batch into a new store of that space (which settles
    ``"auto"`` from the first batch's size times the number of windows) instead of a list; the store is closed
    if the capture fails. ``model_inputs(batch)``: the model's keyword arguments for one batch of the inputs (by
    default token ids: ``{"input_ids": batch, "use_cache": False}``; an image model's pixel values:
    ``{"pixel_values": batch}``).
    """
    model_inputs = model_inputs or _token_inputs
    if len(blocks) == 0:
        raise ValueError("the model has no decoder blocks to prune")
    embed_device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    originals = list(blocks)
    hidden: list[torch.Tensor] | ActivationStore = []
    per_block: list[list[dict[str, Any]]] = [[] for _ in originals]
    seen: dict[tuple, list[torch.Tensor]] = {}  # big keyword tensors kept so far, shared between batches
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            sink: list[tuple[tuple, dict]] = []
            for i, block in enumerate(originals):
                blocks[i] = _Recorder(block, i, sink, last=i == len(originals) - 1)
            try:
                model(**model_inputs(input_ids[start : start + batch_size].to(embed_device)))
            except _CaptureDone:
                pass
            else:
                raise RuntimeError("the model's forward never reached its last decoder block")
            finally:
                for i, block in enumerate(originals):
                    blocks[i] = block
            if len(sink) != len(originals):
                raise RuntimeError(f"captured inputs of {len(sink)} blocks, expected {len(originals)}")
            memo: dict[int, Any] = {}  # per batch: ids of freed tensors may be reused later
            for i, (args, kwargs) in enumerate(sink):
                state = args[0] if args else kwargs["hidden_states"]
                if i == 0:
                    if activations is not None and isinstance(hidden, list):  # first batch: settle where they go
                        rows = max(1, int(state.shape[0]))
                        activations.resolve(state.numel() * state.element_size() * input_ids.shape[0] // rows)
                        hidden = activations.store()
                    hidden.append(state.to(storage_device))
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if len(args) > 1:
                    kw["__args__"] = tuple(args[1:])
                per_block[i].append(_share_equal(move_to(kw, storage_device, memo), seen))
    except BaseException:
        if activations is not None and not isinstance(hidden, list):
            hidden.close()
        raise
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return CapturedInputs(hidden=hidden, kwargs=per_block)


def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Run one block on captured inputs and return its hidden-state output."""
    kw = dict(kwargs)
    extra = kw.pop("__args__", ())
    out = block(hidden, *extra, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out
