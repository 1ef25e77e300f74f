"""One block at a time: accumulate the method's statistics, select, slice, propagate (ALGORITHM.md section 5).

Calibration activations stay on ``storage_device`` (the CPU when computing on a GPU), in host memory or in
files on disk (:mod:`osscar_hf.activations`, ``LoopSettings.activation_storage``); only the block being pruned,
its statistics and one batch at a time live on the compute device. Every block's outputs go to a new store batch
by batch, and the previous stores are closed (on disk: their files deleted) as soon as the block is done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import torch
import torch.nn as nn

from ..activations import ActivationSpace, ActivationStore
from ..arch.spec import ArchSpec
from ..capture import CapturedInputs, call_block, move_to
from ..distributed import reduce_statistics, solve_shared, step
from ..host_memory import peak_host_rss_bytes, release_freed_memory
from ..methods import LayerProblem, LayerStatistics, Selection
from ..report import BlockReport, ConsumerReport
from ..arch import get_submodule
from ..arch.experts import shared_expert_keep
from ..surgery import add_part_biases, block_consumers, prune_attention, prune_mlp
from .experts import combine_experts, expert_solver, expert_statistics, routed_producer
from .settings import LoopSettings
from .statistics import ExpertStatistics, InputStatistics, gated_input_hooks, input_hooks, routed_input_hooks

__all__ = ["PARTS", "SHARED", "BlockStream", "StatisticsSink", "announce_block", "block_consumers", "block_device",
           "consumer_report", "modules_on", "propagate_block", "solve_and_slice"]

logger = logging.getLogger(__name__)

PARTS = ("attention", "mlp")
StatisticsSink = Callable[[int, dict[str, Any]], None]  # (block index, every part's statistics)
SHARED = "shared_expert"  # a mixture of experts' shared expert: a third consumer, sized from the MLP's


def block_device(block: nn.Module) -> torch.device:
    return next((p.device for p in block.parameters()), torch.device("cpu"))


@contextmanager
def modules_on(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """``modules`` on ``device`` for the body, then each back on its own device, also on errors."""
    homes = [block_device(m) for m in modules]
    try:
        for module in modules:
            module.to(device)
        yield
    finally:
        for module, home in zip(modules, homes):
            module.to(home)


def consumer_report(m: int, selection: Selection | None, seconds: float, experts: int = 1) -> ConsumerReport:
    """The report of one consumer's problem of ``m`` structures (of every expert together: ``experts`` times each
    one's) from the method's ``selection`` (None: nothing removed) and its seconds."""
    if selection is None:
        return ConsumerReport(structures=m, kept=m, kept_indices=list(range(m)), solved=False, experts=experts)
    fields = {"seconds": seconds, **(selection.report or {})}
    return ConsumerReport(structures=m, kept=int(selection.kept_groups.numel()),
                          kept_indices=[int(i) for i in selection.kept_groups.tolist()], solved=True,
                          experts=experts, **fields)


def _close(*stores: ActivationStore | None) -> None:
    for store in stores:
        if store is not None:
            with suppress(Exception):
                store.close()


@contextmanager
def _closed_on_error(*stores: ActivationStore | None) -> Iterator[None]:
    """Close ``stores`` (deleting their files) when the body raises; they belong to the caller otherwise."""
    try:
        yield
    except BaseException:
        _close(*stores)
        raise


def _accumulate(
    block: nn.Module,
    spec: ArchSpec,
    consumers: dict[str, nn.Module],
    stats: dict[str, InputStatistics | ExpertStatistics],
    states: ActivationStore,
    kwargs: list[dict[str, Any]],
    dense_states: ActivationStore | None,
    device: torch.device,
    storage: torch.device,
    space: ActivationSpace,
    keep_outputs: bool,
    gates: dict[str, nn.Module] | None = None,
) -> tuple[ActivationStore | None, ActivationStore | None]:
    """Run the (still dense) block on every batch and fold the consumers' inputs into ``stats`` (a Gram is one
    ``addmm_`` per batch and consumer).

    Returns the block's outputs on ``states`` when ``keep_outputs``, and, with ``dense_states`` (dense
    targets), the dense stream's next inputs, as new stores of ``space`` written batch by batch; the block then
    also runs on the dense stream and the cross-Gram X_pruned^T X_dense is accumulated. A consumer named in ``gates``
    (a shared expert's) has each token's input scaled by ``sigmoid(gate(x))``. Keyword arguments are
    moved to the device one batch at a time, so no batch's masks or rotary tables stay there.
    """
    outputs = space.store() if keep_outputs else None
    next_dense = space.store() if dense_states is not None else None
    crossing = {name for name, st in stats.items() if st.cross_gram is not None}
    routed = {n: (consumers[n], routed_producer(spec)) for n, st in stats.items()
              if isinstance(st, ExpertStatistics)}
    gates = gates or {}
    gated = {n: (consumers[n], gates[n]) for n in stats if n in gates}
    plain = {n: consumers[n] for n in stats if n not in routed and n not in gated}
    dense_iter = iter(dense_states) if dense_states is not None else None
    with _closed_on_error(outputs, next_dense):
        for b, state in enumerate(states):
            kw = move_to(kwargs[b], device)
            pruned_inputs: dict[str, torch.Tensor] = {}

            def keep(name: str, x: torch.Tensor) -> None:
                if name in crossing:
                    pruned_inputs[name] = x
                stats[name].add(x)

            def cross(name: str, x: torch.Tensor) -> None:
                stats[name].add_cross(pruned_inputs.pop(name), x)

            with input_hooks(plain, keep), routed_input_hooks(routed, lambda n, e, x: stats[n].add(e, x)), \
                    gated_input_hooks(gated, keep):
                out = call_block(block, state.to(device), kw)
            del state
            if outputs is not None:
                outputs.append(out.to(storage))
            del out
            if next_dense is not None:
                dense = next(dense_iter)
                with input_hooks({n: consumers[n] for n in crossing}, cross):
                    next_dense.append(call_block(block, dense.to(device), kw).to(storage))
                del dense
    return outputs, next_dense


def propagate_block(
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


def _select(
    part: str, consumer: nn.Module, stats: InputStatistics | None, settings: LoopSettings, keep: int
) -> tuple[Selection, float]:
    """The method's selection for one consumer that keeps ``keep`` structures (attention: of the budgets' unit)."""
    release_freed_memory()  # freed temporaries of the forward or of the last solve: not under its peak
    started = time.perf_counter()
    attention = part == "attention"
    layout = settings.attention_layout
    problem = LayerProblem(
        weight=consumer.weight, bias=consumer.bias, num_keep=layout.solver_keep(keep) if attention else keep,
        group_size=layout.group_size if attention else 1,
        statistics=stats.take() if stats is not None else LayerStatistics(),
        solve=settings.attention if attention else settings.mlp,
        partitions=layout.partitions if attention else 1,
    )
    selection = settings.method.select(problem)
    return selection, time.perf_counter() - started


def _select_parts(block: nn.Module, index: int, spec: ArchSpec, settings: LoopSettings, parts: list[str],
                  consumers: dict[str, nn.Module], stats: dict[str, Any], keep: dict[str, int]
                  ) -> dict[str, tuple[Selection, float]]:
    """Every pruned part's selection and its seconds. Each consumer, and each expert of a mixture of experts, is one
    problem: with several ranks they are dealt to the ranks and the answers shared (:func:`solve_shared`)."""
    started = time.perf_counter()
    items: list[Any] = [part for part in parts if not (part == "mlp" and spec.experts is not None)]
    experts: list[tuple[str, int]] = []
    if len(items) < len(parts):
        count, solve_expert = expert_solver(block, spec, stats.pop("mlp", None), settings, keep["mlp"],
                                            f"block {index}")
        experts = [("mlp", e) for e in range(count)]

    def select(item: Any) -> Any:
        if isinstance(item, tuple):
            return solve_expert(item[1])
        return _select("mlp" if item == SHARED else item, consumers[item], stats.pop(item, None), settings,
                       keep[item])

    solved = solve_shared(items + experts, select, settings.ranks, settings.device)
    selections = {part: solved[part] for part in items}
    if experts:
        selections["mlp"] = (combine_experts(block, spec, [solved[item] for item in experts]),
                             time.perf_counter() - started)
    return selections


def _block_parts(block: nn.Module, index: int, spec: ArchSpec, settings: LoopSettings
                 ) -> tuple[dict[str, nn.Module], dict[str, int], dict[str, int]]:
    """The block's consumers by part (a shared expert's too), and each part's kept and full structure counts."""
    size = settings.size(index)
    keep = {"attention": size.attention, "mlp": size.mlp}
    full = {"attention": settings.attention_structures, "mlp": settings.num_neurons}
    consumers = block_consumers(block, spec)
    shared_spec = spec.shared_expert_spec()
    if shared_spec is not None:
        consumers[SHARED] = block_consumers(block, shared_spec)["mlp"]
        full[SHARED] = consumers[SHARED].in_features
        keep[SHARED] = shared_expert_keep(size.mlp, settings.num_neurons, full[SHARED])
    return consumers, keep, full


def _prune_block(
    block: nn.Module,
    index: int,
    spec: ArchSpec,
    settings: LoopSettings,
    states: ActivationStore,
    dense_states: ActivationStore | None,
    kwargs: list[dict[str, Any]],
    space: ActivationSpace,
    sink: StatisticsSink | None = None,
) -> tuple[dict[str, tuple[Selection, float]], ActivationStore, ActivationStore | None]:
    """Select and slice one block (already on the compute device); return each pruned part's selection and its
    time, and the next block's inputs (pruned stream, dense stream) as new stores of ``space``. The input stores
    are left as they are; new stores are closed when an error stops the block. ``sink(index, stats)`` is given
    every part's statistics (pruned or not) before they are solved."""
    device, storage, method = settings.device, settings.storage_device, settings.method
    consumers, keep, full = _block_parts(block, index, spec, settings)
    gates = {SHARED: get_submodule(block, spec.experts.shared.gate)} if SHARED in consumers else {}
    parts = [part for part in keep if keep[part] < full[part]]
    cross = settings.dense_targets and method.refits
    stats: dict[str, InputStatistics | ExpertStatistics] = {
        part: (expert_statistics(block, spec, settings) if part == "mlp" and spec.experts is not None
               else InputStatistics(consumers[part].in_features, device, method.statistics, cross))
        for part in (list(keep) if sink is not None else parts)} if method.statistics else {}
    # Without propagation each block sees the dense model's inputs: its dense outputs feed the next block.
    dense_outputs = next_dense = None
    try:
        with step(settings.ranks):  # each rank on its share of the windows
            if stats or dense_states is not None or not settings.propagate:
                dense_outputs, next_dense = _accumulate(block, spec, consumers, stats, states, kwargs, dense_states,
                                                        device, storage, space, keep_outputs=not settings.propagate,
                                                        gates=gates)
    except BaseException:  # another rank failed: this one's new stores go too
        _close(dense_outputs, next_dense)
        raise
    with _closed_on_error(dense_outputs, next_dense):
        reduce_statistics(stats, settings.ranks)
        if sink is not None:
            sink(index, stats)
        stats = {part: st for part, st in stats.items() if part in parts}
        selections = solve_and_slice(block, index, spec, settings, stats)
        if settings.propagate:
            next_states = propagate_block(block, states, kwargs, device, storage, space)
        else:
            assert dense_outputs is not None
            next_states = dense_outputs
    return selections, next_states, next_dense


def solve_and_slice(block: nn.Module, index: int, spec: ArchSpec, settings: LoopSettings,
                    stats: dict[str, InputStatistics | ExpertStatistics]) -> dict[str, tuple[Selection, float]]:
    """Select every part of block ``index`` that its size prunes, on ``stats`` (consumed), and slice the block (on
    the compute device) accordingly; return each pruned part's selection and its seconds."""
    consumers, keep, full = _block_parts(block, index, spec, settings)
    parts = [part for part in keep if keep[part] < full[part]]
    selections = _select_parts(block, index, spec, settings, parts, consumers, stats, keep)
    stats.clear()
    if "attention" in selections:
        chosen = selections["attention"][0]
        groups, heads = settings.attention_layout.selection(chosen.kept_groups)
        prune_attention(block, spec, groups, n_rep=settings.n_rep, head_dim=settings.head_dim,
                        num_groups=settings.num_attention_groups, kept_heads=heads, o_weight=chosen.weight,
                        o_bias=chosen.bias)
    if "mlp" in selections:
        chosen = selections["mlp"][0]
        prune_mlp(block, spec, chosen.kept_groups, consumer_weight=chosen.weight, consumer_bias=chosen.bias)
    if SHARED in selections:
        chosen = selections[SHARED][0]
        prune_mlp(block, spec.shared_expert_spec(), chosen.kept_groups, consumer_weight=chosen.weight,
                  consumer_bias=chosen.bias)
    return selections


class BlockStream:
    """Prunes decoder blocks one at a time, in order, carrying the calibration activations from each block to
    the next. The orchestration (:mod:`osscar_hf.pipeline.orchestrate`) calls :meth:`prune` for every block,
    whether the blocks live in memory or are read from shards just before.

    Takes ownership of ``captured.hidden`` (emptied, so block-0 inputs are freed as the loop moves on). When
    it is an :class:`~osscar_hf.activations.ActivationStore` (``capture_block_inputs(..., activations=space)``)
    the stream keeps its activations in that store's space, which its creator closes. When it is a list, the
    stream makes its own space from ``settings.activation_storage`` / ``activation_dir`` (``"auto"`` decided
    from the captured tensors' size) and moves the tensors into it; :meth:`close` (or the end of a ``with``
    block) deletes that space's files, as does garbage collection of the stream, failing that.
    """

    def __init__(self, spec: ArchSpec, captured: CapturedInputs, settings: LoopSettings, *,
                 sink: StatisticsSink | None = None) -> None:
        self.spec = spec
        self.settings = settings
        self.sink = sink
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
        """Prune block ``index`` (the next one) to ``settings.sizes[index]`` in place; it goes back to its own
        device, also on errors."""
        settings = self.settings
        device = settings.device
        start = time.perf_counter()
        home = block_device(block)
        shared_spec = self.spec.shared_expert_spec()
        shared_full = get_submodule(block, shared_spec.mlp_consumer).in_features if shared_spec is not None else None
        try:
            block.to(device)
            if settings.method.adds_bias:
                add_part_biases(block, self.spec)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.no_grad():
                selections = self._select_and_slice(index, block)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            attention = consumer_report(settings.attention_layout.solver_groups,
                                         *selections.get("attention", (None, 0.0)))
            mlp = consumer_report(settings.num_neurons * settings.num_experts, *selections.get("mlp", (None, 0.0)),
                                   experts=settings.num_experts)
            shared = (consumer_report(shared_full, *selections.get(SHARED, (None, 0.0)))
                      if shared_full is not None else None)
            del selections  # their tensors live on the device: gone before the cache is emptied
        finally:
            block.to(home)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return BlockReport(
            index=index,
            attention=attention,
            mlp=mlp,
            seconds=time.perf_counter() - start,
            peak_device_memory_bytes=peak,
            peak_host_rss_bytes=peak_host_rss_bytes(),
            shared_expert=shared,
        )

    def _select_and_slice(self, index: int, block: nn.Module) -> dict[str, tuple[Selection, float]]:
        """Accumulate the statistics of block ``index`` (on the compute device) on the stream, solve, slice, and
        move the stream past it."""
        selections, states, next_dense = _prune_block(block, index, self.spec, self.settings, self.states,
                                                      self.dense_states, self.kwargs[index], self.space, self.sink)
        self._advance(states, next_dense)
        return selections

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
        home = block_device(block)
        try:
            block.to(device)
            with torch.no_grad():
                if pruned == settings.propagate:  # the pruned stream's next inputs come from this block
                    new = propagate_block(block, self.states, kwargs, device, storage, self.space)
                    if self._next_states is not None:
                        self._next_states.close()
                    self._next_states = new
                if not pruned and self.dense_states is not None:
                    new = propagate_block(block, self.dense_states, kwargs, device, storage, self.space)
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

    @staticmethod
    def announce(bar: Any, report: BlockReport) -> None:
        """Progress-bar postfix and log line of one pruned block (:func:`announce_block`)."""
        announce_block(bar, report)


def announce_block(bar: Any, report: BlockReport) -> None:
    """Progress-bar postfix and log line of one pruned block."""
    postfix = {"s": f"{report.seconds:.1f}"}
    # Relative reconstruction error of the kept structures before -> after the refit.
    for key, consumer in (("attn_err", report.attention), ("mlp_err", report.mlp)):
        if consumer.solved and consumer.relative_error is not None and consumer.relative_error_masked is not None:
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
