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
search windows gives back its later plans. What the search holds: the current plan's pruned blocks (planning copies, in memory
or in the partial folder, as the first prune's), their outputs on the held-out windows, and the dense model's
log-probabilities at up to :data:`SEARCH_POSITIONS` positions.

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

__all__ = ["SEARCH_POSITIONS", "VALIDATION_EVERY", "search_sizes"]

logger = logging.getLogger(__name__)

SEARCH_POSITIONS = 1024  # next-token distributions the KL is measured on at most (the held-out windows, strided)
VALIDATION_EVERY = 4  # held-out windows 3, 7, 11, ... (of every rank's together) choose among the plans taken


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
    seconds = time.perf_counter() - started
    run.search_summary = {"candidates": tried, "accepted": accepted, "chosen": best_at, "kl_plan": first.all,
                          "kl_searched": best.all, "validation_kl_plan": first.validation,
                          "validation_kl_searched": best.validation, "seconds": seconds}
    logger.info("allocation search: %d of %d candidates taken, the plan after %d of them chosen on the validation "
                "windows; held-out KL from the dense model %.4f -> %.4f (validation %.4f -> %.4f; %.1f s)", accepted,
                tried, best_at, first.all, best.all, first.validation, best.validation, seconds)
    return result


class _Search:
    """The current plan's pruned blocks and held-out outputs, and the dense model's log-probabilities."""

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
        self.validation = _validation_windows(run)
        self.states: list[ActivationStore] = [run.held_out_inputs.hidden.copy()]
        self.kept: dict[int, nn.Module] = {}
        self.dense: list[torch.Tensor] = []

    def __enter__(self) -> _Search:
        return self

    def __exit__(self, *exc: object) -> None:
        for store in self.states:
            store.close()
        for index, module in self.kept.items():
            self.source.drop_scratch(index, module)
        self.kept.clear()

    def start(self, sizes: list[BlockSize]) -> Divergence:
        """Measure the dense model's log-probabilities and the plan ``sizes``; return the plan's KL."""
        outputs = self.states[0].copy()
        try:
            for index, block in enumerate(self.run.blocks):
                self.source.load(index, block)
                try:
                    outputs = self._forward(index, block, outputs, close_input=True)
                finally:
                    self.source.release(index, block)
            with modules_on(self.head, self.device), torch.no_grad():
                self.dense = [self._log_probs(hidden).to(self.storage) for hidden in outputs]
        finally:
            outputs.close()
        self.sizes = list(sizes)
        for index, size in enumerate(sizes):  # each kept as it is built: one pruned block in memory at a time
            self._keep(index, self._build(index, size))
        self.kl, self.states[1:] = self._evaluate(sizes, 0, {})
        return self.kl

    def try_candidate(self, sizes: list[BlockSize]) -> bool:
        """Evaluate ``sizes`` (which differs from the plan in a few blocks); keep it when its KL on the search
        windows is lower."""
        changed = [i for i, (a, b) in enumerate(zip(sizes, self.sizes)) if a != b]
        built = {index: self._build(index, sizes[index]) for index in changed}
        kl, states = self._evaluate(sizes, changed[0], built)
        if kl.search < self.kl.search:
            self.kl = kl
            self._accept(sizes, built, changed[0], states)
            return True
        for store in states:
            store.close()
        return False

    def _accept(self, sizes: list[BlockSize], built: dict[int, nn.Module], start: int,
                states: list[ActivationStore]) -> None:
        for index, module in built.items():
            self._keep(index, module)
        for store in self.states[start + 1:]:
            store.close()
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

    def _evaluate(self, sizes: list[BlockSize], start: int, built: dict[int, nn.Module]
                  ) -> tuple[Divergence, list[ActivationStore]]:
        """The KL of the model at ``sizes`` (blocks before ``start`` as in the plan), and its outputs of blocks
        ``start`` onwards on the held-out windows."""
        states: list[ActivationStore] = []
        hidden = self.states[start]
        try:
            for index in range(start, len(self.run.blocks)):
                module = built.get(index)
                if module is None:
                    module = self.source.scratch(index)
                hidden = self._forward(index, module, hidden, close_input=False)
                states.append(hidden)
                if index not in built:
                    self.source.release_scratch(index, module)
            return self._kl(hidden), states
        except BaseException:
            for store in states:
                store.close()
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

    def _kl(self, outputs: ActivationStore) -> Divergence:
        """KL(dense || pruned) per position, over every rank's search and validation windows."""
        totals = torch.zeros(2, 2, dtype=torch.float64)
        first = 0
        with modules_on(self.head, self.device), torch.no_grad():
            for dense, hidden in zip(self.dense, outputs):
                pruned = self._log_probs(hidden)
                reference = dense.to(self.device)
                per_window = (reference.exp() * (reference - pruned)).sum(-1).double().sum(-1).cpu()
                group = self.validation[first:first + per_window.shape[0]].long()
                first += per_window.shape[0]
                totals[:, 0].index_add_(0, group, per_window)
                totals[:, 1].index_add_(0, group, torch.full_like(per_window, reference.shape[1]))
        if self.run.settings.ranks.distributed:
            sum_in_place(totals, self.run.settings.ranks)
        return Divergence.from_totals(totals)


def _validation_windows(run: PruneRun) -> torch.Tensor:
    """Which of this rank's held-out windows are validation windows (every :data:`VALIDATION_EVERY`-th of all
    ranks' windows together, counted from 0)."""
    count = int(run.held_out.shape[0]) if run.held_out is not None else 0
    shares = held_out_shares(count, run.settings.ranks)
    mine = shares[run.settings.ranks.rank] if shares is not None else range(count)
    return torch.tensor([index % VALIDATION_EVERY == VALIDATION_EVERY - 1 for index in mine])

