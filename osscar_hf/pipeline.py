"""The block loop: accumulate Grams, solve both layer-wise problems, slice, propagate.

Calibration activations stay on ``storage_device`` (the CPU when computing on a GPU), in host memory or in
files on disk (:mod:`osscar_hf.activations`, ``LoopSettings.activation_storage``); only the block being pruned,
its Grams and one batch at a time live on the compute device. Every block's outputs go to a new store batch by
batch, and the previous stores are closed (on disk: their files deleted) as soon as the block is done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .activations import ActivationSpace, ActivationStore
from .arch.spec import ArchSpec, get_submodule
from .capture import CapturedInputs, call_block, move_to
from .host_memory import peak_host_rss_bytes, release_freed_memory
from .report import BlockReport, ConsumerReport
from .solver import LayerSolution, accumulate_cross_gram, accumulate_gram, new_gram, solve_layer
from .solver.packed import square_copy
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
    activation_storage: str = "memory"     # "auto", "memory" or "disk" (see osscar_hf.activations)
    activation_dir: str | None = None      # parent folder of the on-disk activations (None: the temp folder)


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
    # The Gram is dropped right after (``stats.pop``), so the solver may use its storage as its p x p workspace:
    # the largest consumer then needs no second p x p matrix. In another solver dtype (the float32 Gram, a float64
    # solve), the solver would work in a converted copy while the float32 Gram stayed alive: convert it here, in
    # the layout the solver's copy would have, and drop the float32 one before the solve.
    if stats.H.dtype != settings.dtype:
        stats.H = square_copy(stats.H, settings.dtype)
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
        in_place=True,
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


@contextmanager
def _closed_on_error(*stores: ActivationStore | None) -> Iterator[None]:
    """Close ``stores`` (deleting their files) when the body raises; they belong to the caller otherwise."""
    try:
        yield
    except BaseException:
        for store in stores:
            if store is not None:
                with suppress(Exception):
                    store.close()
        raise


def _accumulate(
    block: nn.Module,
    consumers: dict[str, nn.Module],
    stats: dict[str, _GramStats],
    states: ActivationStore,
    kwargs: list[dict[str, Any]],
    dense_states: ActivationStore | None,
    device: torch.device,
    storage: torch.device,
    space: ActivationSpace,
    keep_outputs: bool,
) -> tuple[ActivationStore | None, ActivationStore | None]:
    """Run the (still dense) block on every batch and accumulate the consumers' Grams (one ``addmm_`` per
    batch and consumer).

    Returns the block's outputs on ``states`` when ``keep_outputs``, and, with ``dense_states`` (dense
    targets), the dense stream's next inputs, as new stores of ``space`` written batch by batch; the block then
    also runs on the dense stream and the cross-Gram X_pruned^T X_dense is accumulated. Keyword arguments are
    moved to the device one batch at a time, so no batch's masks or rotary tables stay there.
    """
    outputs = space.store() if keep_outputs else None
    next_dense = space.store() if dense_states is not None else None

    def gram(name: str, x: torch.Tensor) -> None:
        st = stats[name]
        st.count = accumulate_gram(st.H, st.count, x)

    dense_iter = iter(dense_states) if dense_states is not None else None
    with _closed_on_error(outputs, next_dense):
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
            del state
            if outputs is not None:
                outputs.append(out.to(storage))
            del out
            if next_dense is not None:
                dense = next(dense_iter)
                with _input_hooks(consumers, cross):
                    next_dense.append(call_block(block, dense.to(device), kw).to(storage))
                del dense
    return outputs, next_dense


def _propagate(
    block: nn.Module, states: ActivationStore, kwargs: list[dict[str, Any]], device: torch.device,
    storage: torch.device, space: ActivationSpace,
) -> ActivationStore:
    """The block's outputs on ``states``, written batch by batch to a new store of ``space``."""
    outputs = space.store()
    with _closed_on_error(outputs):
        for b, state in enumerate(states):
            outputs.append(call_block(block, state.to(device), move_to(kwargs[b], device)).to(storage))
            del state
    return outputs


def _prune_block(
    block: nn.Module,
    spec: ArchSpec,
    settings: LoopSettings,
    states: ActivationStore,
    dense_states: ActivationStore | None,
    kwargs: list[dict[str, Any]],
    space: ActivationSpace,
) -> tuple[LayerSolution | None, float, LayerSolution | None, float, ActivationStore, ActivationStore | None]:
    """Solve and slice one block (already on the compute device); return the solutions, their solve times,
    and the next block's inputs (pruned stream, dense stream) as new stores of ``space``. The input stores are
    left as they are; new stores are closed when an error stops the block."""
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
                                            space, keep_outputs=not settings.propagate)
    with _closed_on_error(dense_outputs, next_dense):
        solutions: dict[str, tuple[LayerSolution | None, float]] = {"attention": (None, 0.0), "mlp": (None, 0.0)}
        for name, module, problem in (("attention", o_proj, settings.attention), ("mlp", down, settings.mlp)):
            if name in stats:
                release_freed_memory()  # freed temporaries of the forward or of the last solve: not under its peak
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
        if settings.propagate:
            next_states = _propagate(block, states, kwargs, device, storage, space)
        else:
            assert dense_outputs is not None
            next_states = dense_outputs
    return attn_solution, attn_seconds, mlp_solution, mlp_seconds, next_states, next_dense


class BlockStream:
    """Prunes decoder blocks one at a time, in order, carrying the calibration activations from each block to
    the next. Both the in-memory loop (:func:`prune_blocks`) and the streaming one
    (:mod:`osscar_hf.streaming`, which materialises each block from disk just before) call :meth:`prune`.

    Takes ownership of ``captured.hidden`` (emptied, so block-0 inputs are freed as the loop moves on). When
    it is an :class:`~osscar_hf.activations.ActivationStore` (``capture_block_inputs(..., activations=space)``)
    the stream keeps its activations in that store's space, which its creator closes. When it is a list, the
    stream makes its own space from ``settings.activation_storage`` / ``activation_dir`` (``"auto"`` decided
    from the captured tensors' size) and moves the tensors into it; :meth:`close` (or the end of a ``with``
    block) deletes that space's files, as does garbage collection of the stream, failing that.
    """

    def __init__(self, spec: ArchSpec, captured: CapturedInputs, settings: LoopSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.kwargs = captured.kwargs
        hidden, captured.hidden = captured.hidden, []
        self._owns_space = not isinstance(hidden, ActivationStore)
        if isinstance(hidden, ActivationStore):
            self.space = hidden.space
            self.states = hidden
        else:
            self.space = ActivationSpace.for_settings(settings)
            self.space.resolve(sum(h.numel() * h.element_size() for h in hidden))
            self.states = self.space.store()
            try:
                hidden.reverse()  # pop from the end: each tensor leaves the list as it enters the store
                while hidden:
                    self.states.append(hidden.pop())
            except BaseException:
                self.close()
                raise
        self.dense_states = self.states.copy() if settings.dense_targets else None
        self._next_states: ActivationStore | None = None  # computed by replay()
        self._next_dense: ActivationStore | None = None

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
                    block, self.spec, settings, self.states, self.dense_states, self.kwargs[index], self.space
                )
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            attention = _consumer_report(settings.num_attention_groups, attn_solution, attn_seconds)
            mlp = _consumer_report(settings.num_neurons, mlp_solution, mlp_seconds)
            del attn_solution, mlp_solution  # their tensors live on the device: gone before the cache is emptied
        finally:
            block.to(home)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        self._advance(states, next_dense)
        return BlockReport(
            index=index,
            attention=attention,
            mlp=mlp,
            seconds=time.perf_counter() - start,
            peak_device_memory_bytes=peak,
            peak_host_rss_bytes=peak_host_rss_bytes(),
        )

    def _advance(self, states: ActivationStore, dense: ActivationStore | None) -> None:
        """Adopt the next block's inputs; the previous stores are closed (their files deleted) right away."""
        old, self.states = self.states, states
        old.close()
        if dense is not None:
            assert self.dense_states is not None
            old, self.dense_states = self.dense_states, dense
            old.close()

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
                    new = _propagate(block, self.states, kwargs, device, storage, self.space)
                    if self._next_states is not None:
                        self._next_states.close()
                    self._next_states = new
                if not pruned and self.dense_states is not None:
                    new = _propagate(block, self.dense_states, kwargs, device, storage, self.space)
                    if self._next_dense is not None:
                        self._next_dense.close()
                    self._next_dense = new
        finally:
            block.to(home)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def finish_replay(self) -> None:
        """Adopt the streams computed by :meth:`replay` calls for one block."""
        if self._next_states is None or (self.dense_states is not None and self._next_dense is None):
            raise RuntimeError("finish_replay() before the replay() calls that compute the next inputs")
        states, self._next_states = self._next_states, None
        dense, self._next_dense = self._next_dense, None
        self._advance(states, dense)

    def close(self) -> None:
        """Release every stream (on disk: delete the files), and the space when the stream made it. Idempotent."""
        for name in ("states", "dense_states", "_next_states", "_next_dense"):
            store = getattr(self, name, None)
            if store is not None:
                store.close()
        if self._owns_space:
            self.space.close()

    def __enter__(self) -> BlockStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def announce_block(bar: Any, report: BlockReport) -> None:
    """Progress-bar postfix and log line of one pruned block."""
    postfix = {"s": f"{report.seconds:.1f}"}
    # Relative reconstruction error of the kept structures before -> after the refit.
    for key, consumer in (("attn_err", report.attention), ("mlp_err", report.mlp)):
        if consumer.solved:
            postfix[key] = f"{consumer.relative_error_masked:.2e}->{consumer.relative_error:.2e}"
    memory = []
    if report.peak_host_rss_bytes is not None:
        postfix["rss"] = f"{report.peak_host_rss_bytes / 2**30:.2f}G"
        memory.append(f"peak RSS {postfix['rss']}iB")
    if report.peak_device_memory_bytes is not None:
        postfix["dev"] = f"{report.peak_device_memory_bytes / 2**30:.2f}G"
        memory.append(f"peak device memory {postfix['dev']}iB")
    bar.set_postfix(postfix)
    bar.update(1)
    logger.info(
        "block %d: attention %d/%d kept (rel. err masked->refit %s), mlp %d/%d kept (rel. err %s), %.2fs%s",
        report.index, report.attention.kept, report.attention.structures, postfix.get("attn_err", "-"),
        report.mlp.kept, report.mlp.structures, postfix.get("mlp_err", "-"), report.seconds,
        "".join(f", {m}" for m in memory),
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

    Takes ownership of ``captured.hidden`` (emptied, so block-0 inputs are freed as the loop moves on) and
    releases every stream at the end, also on errors (see :class:`BlockStream`). Every block goes back to its
    own device, also when an error stops the loop.
    """
    blocks = get_submodule(model, spec.blocks)
    reports: list[BlockReport] = []
    with BlockStream(spec, captured, settings) as stream:
        bar = tqdm(total=len(blocks), desc="OSSCAR pruning", unit="block", disable=not progress)
        try:
            for index, block in enumerate(blocks):
                report = stream.prune(index, block)
                reports.append(report)
                announce_block(bar, report)
        finally:
            bar.close()
    return reports
