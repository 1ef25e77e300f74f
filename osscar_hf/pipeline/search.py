"""OSSCAR's allocation search: whole pruned models evaluated on the held-out windows, starting from the curves' plan.

The damage curves (:mod:`.sensitivity`) are a second-order estimate around the uniformly pruned model, summed over
blocks as if their errors did not interact. With ``OsscarConfig(allocation_search=N)`` the plan they give is the
start of a search that checks itself against the model: ``N`` candidates, each a budget-neutral exchange between two
blocks' parts (:func:`osscar_hf.budgets.propose_exchange`), are built exactly as the pruning pass will build them
(:func:`~osscar_hf.pipeline.kept.solve_on_kept`: on the Gram matrices the planning kept) and run on the held-out
windows from the first changed block on; a candidate replaces the plan when its KL divergence from the dense model's
next-token distribution is lower on the search windows. Every :data:`VALIDATION_EVERY`-th held-out window is kept
out of that choice (a validation window): each plan the search takes is measured on them too, and the search
returns the one of lowest validation KL (the curves' plan included), so that a long search which overfits the
search windows gives back its later plans.

A candidate is measured in two stages (racing): first on every :data:`FIRST_STAGE_EVERY`-th batch of held-out windows
(batches 0, 4, 8, ... of ``batch_size`` windows, of every rank's windows together), and only if its search KL there is
lower than the plan's on the same windows, on the rest. Most candidates are rejected, many of them after the first
stage, so more held-out windows cost less than their forwards; a candidate taken was measured on all of them. (With
a single batch of held-out windows there is one stage.) Which windows a stage holds does not depend on how the ranks
share them, so every layout takes the same decisions; the first stage runs on the ranks that hold its windows.

What the search holds: the current plan's pruned blocks (planning copies, in memory or in the partial folder, as
the first prune's), their outputs on the held-out windows, and the dense model's log-probabilities at up to
:data:`SEARCH_POSITIONS` positions.

Under ``torch.distributed`` every rank runs the same candidates (one generator, seeded) on its share of the held-out
windows, and the KL's sums are summed over the ranks, so every rank takes the same decisions.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..activations import ActivationStore
from ..budgets import BlockSize, ExchangeBudget, propose_exchange
from ..distributed import step, sum_in_place
from .block import block_device, modules_on, propagate_block
from .kept import solve_on_kept
from .run import BlockSource, PruneRun, scratch_copy
from .sensitivity import held_out_shares

__all__ = ["FIRST_STAGE_EVERY", "SEARCH_POSITIONS", "VALIDATION_EVERY", "search_sizes"]

logger = logging.getLogger(__name__)

SEARCH_POSITIONS = 1024  # next-token distributions the KL is measured on at most (the held-out windows, strided)
VALIDATION_EVERY = 4  # held-out windows 3, 7, 11, ... (of every rank's together) choose among the plans taken
FIRST_STAGE_EVERY = 4  # held-out batches 0, 4, 8, ...: a candidate not better there is not measured further


@dataclass(frozen=True)
class Divergence:
    """The KL from the dense model per position: on the search windows, on the validation windows, on both."""

    search: float
    validation: float
    all: float

    @classmethod
    def from_totals(cls, totals: torch.Tensor) -> Divergence:
        """``totals[g] = (KL sum, positions)`` of the search (g = 0) and validation (g = 1) windows."""
        def mean(kl: torch.Tensor, count: torch.Tensor) -> float:
            return float(kl / count) if count > 0 else math.nan

        both = totals.sum(0)
        search = mean(*totals[0])
        return cls(search=search, validation=mean(*totals[1]) if totals[1, 1] > 0 else search, all=mean(*both))


def search_sizes(run: PruneRun, source: BlockSource, sizes: list[BlockSize], *, progress: bool = True
                 ) -> list[BlockSize]:
    """``sizes`` improved by ``run.config.allocation_search`` candidate exchanges (see the module docstring)."""
    count = run.config.allocation_search
    if not count:
        return sizes
    started = time.perf_counter()
    budget = ExchangeBudget.from_config(run.config, run.geometries)
    rng = random.Random(run.config.seed)
    with _Search(run, source) as search:
        first = search.start(sizes)
        best, best_at, result = first, 0, list(sizes)
        accepted = tried = 0
        bar = tqdm(total=count, desc="planning: allocation search", unit="candidate", disable=not progress)
        try:
            rejected: set[tuple[BlockSize, ...]] = set()  # since the last plan taken: they would be again
            for _ in range(count):
                candidate = propose_exchange(search.sizes, budget, rng, rejected)
                if candidate is None:
                    logger.info("allocation search: no untried exchange fits the floors and the target any more")
                    break
                tried += 1
                if not search.try_candidate(candidate):
                    rejected.add(tuple(candidate))
                else:
                    rejected.clear()
                    accepted += 1
                    if search.kl.validation < best.validation:
                        best, best_at, result = search.kl, accepted, list(search.sizes)
                bar.set_postfix({"kl": f"{search.kl.search:.4f}", "validation": f"{best.validation:.4f}"})
                bar.update(1)
        finally:
            bar.close()
        rejected_early = search.rejected_early
    seconds = time.perf_counter() - started
    run.search_summary = {"candidates": tried, "accepted": accepted, "rejected_early": rejected_early,
                          "chosen": best_at, "kl_plan": first.all, "kl_searched": best.all,
                          "validation_kl_plan": first.validation, "validation_kl_searched": best.validation,
                          "seconds": seconds}
    logger.info("allocation search: %d of %d candidates taken (%d rejected on the first stage of windows), the plan "
                "after %d of them chosen on the validation windows; held-out KL from the dense model %.4f -> %.4f "
                "(validation %.4f -> %.4f; %.1f s)", accepted, tried, rejected_early, best_at, first.all, best.all,
                first.validation, best.validation, seconds)
    return result


class _Search:
    """The current plan's pruned blocks and held-out outputs, and the dense model's log-probabilities.

    ``states[i][k]``: the inputs of block ``i`` (``i = len(blocks)``: the last block's outputs) for this rank's held-out
    batches measured in stage ``k`` (``stages[k]``), in the current plan; ``totals[s, g] = (KL sum, positions)`` of the
    plan over every rank's windows of stage ``s`` and group ``g`` (0: search windows, 1: validation windows).
    """

    def __init__(self, run: PruneRun, source: BlockSource) -> None:
        if run.held_out_inputs is None or not isinstance(run.held_out_inputs.hidden, ActivationStore):
            raise RuntimeError("the allocation search needs the held-out windows captured (see orchestrate.capture)")
        self.run, self.source = run, source
        self.device, self.storage = run.settings.device, run.settings.storage_device
        self.kwargs = run.held_out_inputs.kwargs
        self.head = run.spec.head_modules(run.model)
        tokens = int(run.held_out.numel()) if run.held_out is not None else 0
        self.stride = max(1, math.ceil(tokens / SEARCH_POSITIONS))
        self.sizes: list[BlockSize] = []
        self.kl = Divergence(math.inf, math.inf, math.inf)
        self.validation, self.window_stage = _window_groups(run)
        self.stages: list[list[int]] = []
        self.states: list[list[ActivationStore]] = []
        self.totals = torch.zeros(2, 2, 2, dtype=torch.float64)
        self.kept: dict[int, nn.Module] = {}
        self.dense: list[torch.Tensor] = []  # the dense model's log-probabilities, per batch
        self.first_window: list[int] = []  # per batch: the index of its first window among this rank's
        self.rejected_early = 0

    def __enter__(self) -> _Search:
        return self

    def __exit__(self, *exc: object) -> None:
        for stores in self.states:
            _close(stores)
        for index, module in self.kept.items():
            self.source.drop_scratch(index, module)
        self.kept.clear()

    def start(self, sizes: list[BlockSize]) -> Divergence:
        """Measure the dense model's log-probabilities and the plan ``sizes``; return the plan's KL."""
        self._measure_dense()
        self.stages = self._batch_stages()
        self.states = [[self.run.held_out_inputs.hidden.subset(batches) for batches in self.stages]]
        self.sizes = list(sizes)
        for index, size in enumerate(sizes):  # each kept as it is built: one pruned block in memory at a time
            self._keep(index, self._build(index, size))
        measured: list[list[ActivationStore]] = []
        try:
            for stage in range(len(self.stages)):
                totals, states = self._evaluate(sizes, 0, {}, stage)
                self.totals += totals
                measured.append(states)
        except BaseException:
            for states in measured:
                _close(states)
            raise
        self.states[1:] = [list(stores) for stores in zip(*measured)]
        self.kl = Divergence.from_totals(self.totals.sum(0))
        return self.kl

    def _measure_dense(self) -> None:
        """The dense model's log-probabilities on every held-out batch of this rank, and where each batch starts."""
        outputs = self.run.held_out_inputs.hidden.copy()
        try:
            for index, block in enumerate(self.run.blocks):
                self.source.load(index, block)
                try:
                    outputs = self._forward(index, block, outputs, close_input=True)
                finally:
                    self.source.release(index, block)
            with modules_on(self.head, self.device), torch.no_grad():
                for hidden in outputs:
                    self.first_window.append(sum(d.shape[0] for d in self.dense))
                    self.dense.append(self._log_probs(hidden).to(self.storage))
        finally:
            outputs.close()

    def try_candidate(self, sizes: list[BlockSize]) -> bool:
        """Evaluate ``sizes`` (which differs from the plan in a few blocks) stage by stage; keep it when its KL on the
        search windows is lower (a candidate not lower on the first stage's windows is rejected there)."""
        changed = [i for i, (a, b) in enumerate(zip(sizes, self.sizes)) if a != b]
        built = {index: self._build(index, sizes[index]) for index in changed}
        totals = torch.zeros_like(self.totals)
        states: list[list[ActivationStore]] = []
        try:
            for stage in range(len(self.stages)):
                stage_totals, stage_states = self._evaluate(sizes, changed[0], built, stage)
                totals += stage_totals
                states.append(stage_states)
                if stage + 1 < len(self.stages) and not totals[0, 0, 0] < self.totals[0, 0, 0]:
                    self.rejected_early += 1
                    return False
            kl = Divergence.from_totals(totals.sum(0))
            if kl.search >= self.kl.search:
                return False
            self.kl, self.totals = kl, totals
            self._accept(sizes, built, changed[0], [list(stores) for stores in zip(*states)])
            states = []  # the plan's now
            return True
        finally:
            for stores in states:
                _close(stores)

    def _batch_stages(self) -> list[list[int]]:
        """This rank's held-out batches in the order of the stages: first those holding a window of the first stage;
        one stage when no window of any rank is in the second (all of them in one batch)."""
        if int(self.run.held_out.shape[0]) <= self.run.config.batch_size:
            return [list(range(len(self.dense)))]
        first = [bool((self.window_stage[start:start + d.shape[0]] == 0).any())
                 for start, d in zip(self.first_window, self.dense)]
        return [[b for b, f in enumerate(first) if f], [b for b, f in enumerate(first) if not f]]

    def _accept(self, sizes: list[BlockSize], built: dict[int, nn.Module], start: int,
                states: list[list[ActivationStore]]) -> None:
        for index, module in built.items():
            self._keep(index, module)
        for stores in self.states[start + 1:]:
            _close(stores)
        self.states[start + 1:] = states
        self.sizes = list(sizes)

    def _keep(self, index: int, module: nn.Module) -> None:
        """Block ``index`` of the plan is ``module`` now (a planning copy: in memory, or in the partial folder)."""
        self.source.keep_scratch(index, module)
        self.kept[index] = module

    def _build(self, index: int, size: BlockSize) -> nn.Module:
        """Block ``index`` pruned to ``size`` as the pruning pass prunes it: on the Grams the planning kept."""
        run = self.run
        module = scratch_copy(self.source, index, run.blocks[index])
        home = block_device(module)
        sizes = list(self.sizes)
        sizes[index] = size
        with step(run.settings.ranks), torch.no_grad():
            solve_on_kept(self.source, module.to(self.device), index, run.spec, run.settings.with_sizes(sizes))
        return module.to(home)

    def _evaluate(self, sizes: list[BlockSize], start: int, built: dict[int, nn.Module], stage: int
                  ) -> tuple[torch.Tensor, list[ActivationStore]]:
        """The KL sums of the model at ``sizes`` (blocks before ``start`` as in the plan) on the held-out batches of
        ``stage``, and its outputs of blocks ``start`` onwards there."""
        states: list[ActivationStore] = []
        hidden = self.states[start][stage]
        try:
            for index in range(start, len(self.run.blocks)):
                module = built.get(index)
                if module is None:
                    module = self.source.scratch(index)
                hidden = self._forward(index, module, hidden, close_input=False)
                states.append(hidden)
                if index not in built:
                    self.source.release_scratch(index, module)
            return self._totals(hidden, self.stages[stage]), states
        except BaseException:
            _close(states)
            raise

    def _forward(self, index: int, module: nn.Module, inputs: ActivationStore, *, close_input: bool
                 ) -> ActivationStore:
        with modules_on([module], self.device), step(self.run.settings.ranks), torch.no_grad():
            outputs = propagate_block(module, inputs, self.kwargs[index], self.device, self.storage, inputs.space)
        if close_input:
            inputs.close()
        return outputs

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden[:, ::self.stride].to(self.device)
        logits = self.run.spec.head_logits(self.run.model.config, self.head, x).float()
        return F.log_softmax(logits, -1)

    def _totals(self, outputs: ActivationStore, batches: list[int]) -> torch.Tensor:
        """``totals[s, g] = (sum of KL(dense || pruned), positions)`` over every rank's windows of stage ``s`` and
        group ``g`` in the held-out ``batches`` (this rank's, whose last block outputs are ``outputs``)."""
        totals = torch.zeros(2, 2, 2, dtype=torch.float64)
        cells = totals.view(4, 2)  # (stage, group) flattened
        with modules_on(self.head, self.device), torch.no_grad():
            for batch, hidden in zip(batches, outputs):
                pruned = self._log_probs(hidden)
                reference = self.dense[batch].to(self.device)
                per_window = (reference.exp() * (reference - pruned)).sum(-1).double().sum(-1).cpu()
                windows = slice(self.first_window[batch], self.first_window[batch] + per_window.shape[0])
                cell = self.window_stage[windows] * 2 + self.validation[windows]
                cells[:, 0].index_add_(0, cell, per_window)
                cells[:, 1].index_add_(0, cell, torch.full_like(per_window, reference.shape[1]))
        if self.run.settings.ranks.distributed:
            sum_in_place(totals, self.run.settings.ranks)
        return totals


def _close(stores: list[ActivationStore]) -> None:
    for store in stores:
        store.close()


def _window_groups(run: PruneRun) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of this rank's held-out windows: whether it is a validation window (every :data:`VALIDATION_EVERY`-th
    of all ranks' windows together, counted from 0), and its stage (0: in every :data:`FIRST_STAGE_EVERY`-th batch of
    ``batch_size`` of all ranks' windows together, measured first; 1: the others)."""
    count = int(run.held_out.shape[0]) if run.held_out is not None else 0
    shares = held_out_shares(count, run.settings.ranks)
    mine = shares[run.settings.ranks.rank] if shares is not None else range(count)
    validation = torch.tensor([index % VALIDATION_EVERY == VALIDATION_EVERY - 1 for index in mine], dtype=torch.long)
    stage = torch.tensor([(index // run.config.batch_size) % FIRST_STAGE_EVERY != 0 for index in mine],
                         dtype=torch.long)
    return validation, stage

