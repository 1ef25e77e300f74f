"""The block loop: accumulate Grams, solve both layer-wise problems, slice, propagate.

Calibration activations stay on ``storage_device`` (the CPU when computing on a GPU); only the block
being pruned, its Grams and one batch at a time live on the compute device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .arch.spec import ArchSpec, get_submodule
from .capture import CapturedInputs, call_block, move_to
from .report import BlockReport, ConsumerReport, peak_host_rss_bytes
from .solver import LayerSolution, accumulate_cross_gram, accumulate_gram, new_gram, solve_layer
from .surgery import group_channels, prune_attention, prune_mlp

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProblemSettings:
    """How to solve one consumer's problem (taken from an OsscarConfig)."""

    num_keep: int
    group_size: int
    step: int
    swap_size: int
    local_search_iters: int
    damping: float
    dtype: torch.dtype


@dataclass(frozen=True)
class LoopSettings:
    attention: ProblemSettings
    mlp: ProblemSettings
    num_attention_groups: int
    n_rep: int
    head_dim: int
    num_neurons: int
    device: torch.device
    storage_device: torch.device
    propagate: bool
    dense_targets: bool


class _GramStats:
    """Running Gram (and, for dense targets, cross-Gram) of one consumer's inputs."""

    def __init__(self, p: int, device: torch.device, cross: bool) -> None:
        self.H = new_gram(p, device)
        self.G = new_gram(p, device) if cross else None
        self.count = 0
        self.count_cross = 0


@contextmanager
def _input_hooks(modules: dict[str, nn.Module], callback: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
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


def _block_device(block: nn.Module) -> torch.device:
    return next((p.device for p in block.parameters()), torch.device("cpu"))


def _solve(stats: _GramStats, consumer: nn.Linear, settings: ProblemSettings) -> LayerSolution:
    return solve_layer(
        stats.H,
        consumer.weight.detach().T,
        group_size=settings.group_size,
        num_keep=settings.num_keep,
        damping=settings.damping,
        step=settings.step,
        local_search_iters=settings.local_search_iters,
        swap_size=settings.swap_size,
        dtype=settings.dtype,
        cross_gram=stats.G,
    )


def _consumer_report(m: int, solution: LayerSolution | None, seconds: float) -> ConsumerReport:
    if solution is None:
        return ConsumerReport(structures=m, kept=m, kept_indices=list(range(m)), solved=False)
    return ConsumerReport(
        structures=m,
        kept=int(solution.kept_groups.numel()),
        kept_indices=[int(i) for i in solution.kept_groups.tolist()],
        solved=True,
        objective_dense=solution.objective_dense,
        objective_stage_a=solution.objective_stage_a,
        objective=solution.objective,
        relative_error=solution.relative_error,
        relative_error_masked=solution.relative_error_masked,
        swaps_accepted=solution.swaps_accepted,
        damping=solution.damping_used,
        seconds=seconds,
    )


def _refit_weight(solution: LayerSolution, group_size: int) -> torch.Tensor:
    """The consumer's new (out x kept inputs) weight from the solver's input-major solution."""
    channels = group_channels(solution.kept_groups, group_size).to(solution.weight.device)
    return solution.weight.index_select(0, channels).T.contiguous()


def _accumulate(
    block: nn.Module,
    consumers: dict[str, nn.Module],
    stats: dict[str, _GramStats],
    states: list[torch.Tensor],
    kwargs: list[dict[str, Any]],
    dense_states: list[torch.Tensor] | None,
    device: torch.device,
    storage: torch.device,
    keep_outputs: bool,
) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """Run the (still dense) block on every batch and accumulate the consumers' Grams (one ``addmm_`` per
    batch and consumer).

    Returns the block's outputs on ``states`` when ``keep_outputs``, and, with ``dense_states`` (dense
    targets), the dense stream's next inputs; the block then also runs on the dense stream and the
    cross-Gram X_pruned^T X_dense is accumulated. Keyword arguments are moved to the device one batch at a
    time, so no batch's masks or rotary tables stay there.
    """
    outputs: list[torch.Tensor] | None = [] if keep_outputs else None
    next_dense: list[torch.Tensor] | None = [] if dense_states is not None else None

    def gram(name: str, x: torch.Tensor) -> None:
        st = stats[name]
        st.count = accumulate_gram(st.H, st.count, x)

    for b, state in enumerate(states):
        kw = move_to(kwargs[b], device)
        pruned_inputs: dict[str, torch.Tensor] = {}

        def keep(name: str, x: torch.Tensor) -> None:
            if dense_states is not None:
                pruned_inputs[name] = x
            gram(name, x)

        def cross(name: str, x: torch.Tensor) -> None:
            st = stats[name]
            st.count_cross = accumulate_cross_gram(st.G, st.count_cross, pruned_inputs.pop(name), x)

        with _input_hooks(consumers, keep):
            out = call_block(block, state.to(device), kw)
        if outputs is not None:
            outputs.append(out.to(storage))
        del out
        if next_dense is not None:
            with _input_hooks(consumers, cross):
                next_dense.append(call_block(block, dense_states[b].to(device), kw).to(storage))
    return outputs, next_dense


def _propagate(
    block: nn.Module, states: list[torch.Tensor], kwargs: list[dict[str, Any]], device: torch.device,
    storage: torch.device,
) -> list[torch.Tensor]:
    return [call_block(block, s.to(device), move_to(kwargs[b], device)).to(storage) for b, s in enumerate(states)]


def _prune_block(
    block: nn.Module,
    spec: ArchSpec,
    settings: LoopSettings,
    states: list[torch.Tensor],
    dense_states: list[torch.Tensor] | None,
    kwargs: list[dict[str, Any]],
) -> tuple[LayerSolution | None, float, LayerSolution | None, float, list[torch.Tensor], list[torch.Tensor] | None]:
    """Solve and slice one block (already on the compute device); return the solutions, their solve times,
    and the next block's inputs (pruned stream, dense stream)."""
    device, storage = settings.device, settings.storage_device
    o_proj = get_submodule(block, f"{spec.attention}.{spec.o_proj}")
    down = get_submodule(block, spec.mlp_consumer)
    consumers: dict[str, nn.Module] = {}
    if settings.attention.num_keep < settings.num_attention_groups:
        consumers["attention"] = o_proj
    if settings.mlp.num_keep < settings.num_neurons:
        consumers["mlp"] = down
    stats = {name: _GramStats(module.in_features, device, settings.dense_targets) for name, module in consumers.items()}
    # Without propagation each block sees the dense model's inputs: its dense outputs feed the next block.
    dense_outputs, next_dense = _accumulate(block, consumers, stats, states, kwargs, dense_states, device, storage,
                                            keep_outputs=not settings.propagate)
    solutions: dict[str, tuple[LayerSolution | None, float]] = {"attention": (None, 0.0), "mlp": (None, 0.0)}
    for name, module, problem in (("attention", o_proj, settings.attention), ("mlp", down, settings.mlp)):
        if name in stats:
            t = time.perf_counter()
            solutions[name] = (_solve(stats.pop(name), module, problem), time.perf_counter() - t)
    del stats
    attn_solution, attn_seconds = solutions["attention"]
    mlp_solution, mlp_seconds = solutions["mlp"]
    if attn_solution is not None:
        prune_attention(
            block, spec, attn_solution.kept_groups, n_rep=settings.n_rep, head_dim=settings.head_dim,
            num_groups=settings.num_attention_groups,
            o_weight=_refit_weight(attn_solution, settings.attention.group_size),
        )
    if mlp_solution is not None:
        prune_mlp(block, spec, mlp_solution.kept_groups,
                  consumer_weight=_refit_weight(mlp_solution, settings.mlp.group_size))
    next_states = _propagate(block, states, kwargs, device, storage) if settings.propagate else dense_outputs
    return attn_solution, attn_seconds, mlp_solution, mlp_seconds, next_states, next_dense


class BlockStream:
    """Prunes decoder blocks one at a time, in order, carrying the calibration activations from each block to
    the next. Both the in-memory loop (:func:`prune_blocks`) and the streaming one
    (:mod:`osscar_hf.streaming`, which materialises each block from disk just before) call :meth:`prune`.

    Takes ownership of ``captured.hidden`` (emptied, so block-0 inputs are freed as the loop moves on).
    """

    def __init__(self, spec: ArchSpec, captured: CapturedInputs, settings: LoopSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.kwargs = captured.kwargs
        self.states, captured.hidden = captured.hidden, []
        self.dense_states = list(self.states) if settings.dense_targets else None
        self._next_states: list[torch.Tensor] | None = None  # computed by replay()
        self._next_dense: list[torch.Tensor] | None = None

    def prune(self, index: int, block: nn.Module) -> BlockReport:
        """Prune block ``index`` (the next one) in place; it goes back to its own device, also on errors."""
        settings = self.settings
        device = settings.device
        start = time.perf_counter()
        home = _block_device(block)
        try:
            block.to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.no_grad():
                attn_solution, attn_seconds, mlp_solution, mlp_seconds, states, next_dense = _prune_block(
                    block, self.spec, settings, self.states, self.dense_states, self.kwargs[index]
                )
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        finally:
            block.to(home)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        self.states = states
        if next_dense is not None:
            self.dense_states = next_dense
        return BlockReport(
            index=index,
            attention=_consumer_report(settings.num_attention_groups, attn_solution, attn_seconds),
            mlp=_consumer_report(settings.num_neurons, mlp_solution, mlp_seconds),
            seconds=time.perf_counter() - start,
            peak_device_memory_bytes=peak,
            peak_host_rss_bytes=peak_host_rss_bytes(),
        )

    def replay(self, index: int, block: nn.Module, *, pruned: bool) -> None:
        """Move the stream past block ``index`` without solving it again (resuming an interrupted run).

        Gives the next inputs :meth:`prune` gave: call it with the dense block (``pruned=False``) when
        ``not settings.propagate`` or ``settings.dense_targets``, and with the pruned block (``pruned=True``)
        when ``settings.propagate``; the two calls read the same inputs and update different streams.
        """
        settings = self.settings
        device, storage = settings.device, settings.storage_device
        kwargs = self.kwargs[index]
        home = _block_device(block)
        try:
            block.to(device)
            with torch.no_grad():
                if pruned == settings.propagate:  # the pruned stream's next inputs come from this block
                    self._next_states = _propagate(block, self.states, kwargs, device, storage)
                if not pruned and self.dense_states is not None:
                    self._next_dense = _propagate(block, self.dense_states, kwargs, device, storage)
        finally:
            block.to(home)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def finish_replay(self) -> None:
        """Adopt the streams computed by :meth:`replay` calls for one block."""
        if self._next_states is None or (self.dense_states is not None and self._next_dense is None):
            raise RuntimeError("finish_replay() before the replay() calls that compute the next inputs")
        self.states, self._next_states = self._next_states, None
        if self.dense_states is not None:
            self.dense_states, self._next_dense = self._next_dense, None


def announce_block(bar: Any, report: BlockReport) -> None:
    """Progress-bar postfix and log line of one pruned block."""
    postfix = {"s": f"{report.seconds:.1f}"}
    # Relative reconstruction error of the kept structures before -> after the refit.
    for key, consumer in (("attn_err", report.attention), ("mlp_err", report.mlp)):
        if consumer.solved:
            postfix[key] = f"{consumer.relative_error_masked:.2e}->{consumer.relative_error:.2e}"
    bar.set_postfix(postfix)
    bar.update(1)
    logger.info(
        "block %d: attention %d/%d kept (rel. err masked->refit %s), mlp %d/%d kept (rel. err %s), %.2fs",
        report.index, report.attention.kept, report.attention.structures, postfix.get("attn_err", "-"),
        report.mlp.kept, report.mlp.structures, postfix.get("mlp_err", "-"), report.seconds,
    )


def prune_blocks(
    model: nn.Module,
    spec: ArchSpec,
    captured: CapturedInputs,
    settings: LoopSettings,
    *,
    progress: bool = True,
) -> list[BlockReport]:
    """Prune every decoder block of ``model`` in turn (see ALGORITHM.md, section 5).

    Takes ownership of ``captured.hidden`` (emptied, so block-0 inputs are freed as the loop moves on).
    Every block goes back to its own device, also when an error stops the loop.
    """
    blocks = get_submodule(model, spec.blocks)
    stream = BlockStream(spec, captured, settings)
    reports: list[BlockReport] = []
    bar = tqdm(total=len(blocks), desc="OSSCAR pruning", unit="block", disable=not progress)
    try:
        for index, block in enumerate(blocks):
            report = stream.prune(index, block)
            reports.append(report)
            announce_block(bar, report)
    finally:
        bar.close()
    return reports
