"""OSSCAR's global allocation: damage curves in units of the loss of the pruned model.

Local reconstruction errors on dense inputs do not say how much damage reaches the model's output (see
``docs/budgets.md``: allocations from them are worse than uniform). This planning pass measures the damage of each
consumer's error where it matters, in the model that pruning produces:

1. **A first, uniform prune** (stage A only) of scratch copies of the blocks, to the target size with the same
   fraction in every block, carrying the calibration windows and the held-out windows (``allocation_samples``
   windows of the calibration data that overlap none of the calibration windows) through the pruned blocks.
2. **A backward sweep** on the held-out windows through that pruned model, block by block from the LM head down:
   the labels are sampled from the pruned model's own next-token distribution (so the gradient's second moment is
   its Fisher information), and for every consumer the sweep records the gradient ``g`` of the loss at its output
   and, from the *dense* block run on the same (pruned-stream) inputs, the consumer's inputs ``x``.
3. **Damage curves**: for each consumer, stage A from all structures down to the floor on the objective weighted by
   the output-gradient second moment ``G = E[g g^T]`` and the token-weighted Gram ``E[w x x^T]`` (``w``: the token's
   gradient energy, normalised to mean 1, so tokens the loss does not feel, such as those carrying massive
   activations, weigh little): ``1/2 E[(g^T D^T x)^2]``, the loss increase, to second order, that the consumer's
   error ``D`` causes in the pruned model.
4. The budget is spent on those curves (:func:`osscar_hf.budgets.global_sizes`).

The pass works on copies (in memory) or re-reads the blocks (streamed), so the pruning pass that follows starts
from the dense blocks and the captured block-0 inputs.

Under ``torch.distributed`` each rank carries its contiguous share of the held-out windows (:func:`held_out_shares`)
through both passes; the last block's held-out outputs are gathered so that every rank samples the labels of all
windows, batch by batch, exactly as one process does (the same generator, the same order), and the consumers'
moments are summed over the ranks before the curves. With fewer windows than ranks every rank runs them all.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..activations import ActivationStore
from ..budgets import BlockGeometry, BlockSize, allowed_sizes, global_sizes, part_floors, uniform_budget_sizes
from ..capture import CapturedInputs, call_block, move_to
from ..config import OsscarConfig
from ..distributed import Ranks, gather_rows, step, sum_in_place
from ..methods import get_method
from ..solver.curves import damage_curve, interpolate_curve
from .block import PARTS, BlockStream, block_consumers, block_device, modules_on, propagate_block
from .run import BlockSource, PruneRun, scratch_copy
from .statistics import statistics_tensors

__all__ = ["ConsumerMoments", "first_prune_sizes", "held_out_shares", "sensitivity_sizes"]

logger = logging.getLogger(__name__)

CURVE_POINTS = 128  # stage-A steps of a damage curve at most (the MLP step is neurons / CURVE_POINTS)
HEAD_TOKENS = 4096  # tokens per LM-head evaluation in the backward sweep (bounds the logits' memory)
# The fraction of the calibration batches the uniform first prune calibrates on. Measured on SmolLM2 at 54.2% kept:
# with a quarter of them the first prune is a worse model, and so is the allocation measured in it (198 instead of
# 141 WikiText-2, worse than uniform): keep all.
FIRST_PRUNE_BATCHES = 1.0
# The planning solves' dtype (the first prune and the damage curves; None: the config's solver dtype). float32 gave
# the same allocation quality as float64 on SmolLM2 (141.7 against 140.9) in a third less planning time.
PLANNING_DTYPE: torch.dtype | None = torch.float32


def sensitivity_sizes(run: PruneRun, source: BlockSource, captured: CapturedInputs, *, progress: bool = True
                      ) -> list[BlockSize]:
    """Every block's kept sizes from damage measured in the uniformly pruned model (see the module docstring)."""
    if run.held_out_inputs is None or not isinstance(run.held_out_inputs.hidden, ActivationStore):
        raise RuntimeError("OSSCAR's allocation needs the held-out windows captured (see orchestrate.capture)")
    started = time.perf_counter()
    held_inputs = _first_prune(run, source, captured, progress)
    pruned = time.perf_counter()
    try:
        damage = _backward_sweep(run, source, held_inputs, progress)
    finally:
        for store in held_inputs:
            store.close()
    logger.info("planning: uniform first prune %.1f s, sensitivity sweep and damage curves %.1f s",
                pruned - started, time.perf_counter() - pruned)
    return global_sizes(run.config, run.geometries, damage)


def _first_prune(run: PruneRun, source: BlockSource, captured: CapturedInputs, progress: bool
                 ) -> list[ActivationStore]:
    """Prune scratch copies uniformly to the target (stage A only); return every block's held-out inputs (the last
    entry: the last block's held-out outputs)."""
    settings = run.settings
    uniform = first_prune_sizes(run.config, run.geometries)
    dtype = PLANNING_DTYPE or settings.attention.dtype
    # The first prune is a measurement: OSSCAR's stage A whatever the method (exact greedy would only be slower).
    first = replace(settings, method=get_method("osscar"), sizes=tuple(uniform), dense_targets=False, propagate=True,
                    attention=replace(settings.attention, local_search_iters=0, dtype=dtype),
                    mlp=replace(settings.mlp, local_search_iters=0, dtype=dtype))
    probe = run.held_out_inputs
    held = probe.hidden.copy()
    stores = [held]
    batches = max(1, round(len(captured.hidden) * FIRST_PRUNE_BATCHES))
    sink = None
    if run.config.keeps_planning_grams():  # the pruning pass solves on these Grams (see .kept)
        def sink(index: int, stats: dict) -> None:
            source.keep_statistics(index, statistics_tensors(stats, settings.storage_device))

        size = sum(c.in_features ** 2 * 4 for b in run.blocks for c in block_consumers(b, run.spec).values())
        logger.info("keeping the planning's Gram matrices for the pruning pass: %.2f GiB at most, each released once "
                    "its block is pruned (reuse_planning_grams=False does without)", size / 2**30)
    bar = tqdm(total=len(run.blocks), desc="planning: uniform prune", unit="block", disable=not progress)
    try:
        with BlockStream(run.spec, CapturedInputs(captured.hidden.copy(batches), captured.kwargs), first,
                         sink=sink) as stream:
            for index, block in enumerate(run.blocks):
                module = scratch_copy(source, index, block)
                stream.prune(index, module)
                home = block_device(module)
                with torch.no_grad():
                    held = propagate_block(module.to(settings.device), held, probe.kwargs[index], settings.device,
                                           settings.storage_device, held.space)
                stores.append(held)
                source.keep_scratch(index, module.to(home))
                bar.update(1)
    except BaseException:
        for store in stores:
            store.close()
        raise
    finally:
        bar.close()
    return stores


def first_prune_sizes(config: OsscarConfig, geometries: list[BlockGeometry]) -> list[BlockSize]:
    """The uniform sizes of the target, raised to the floors and to one structure per part: every part the
    allocation may choose keeps an output whose gradient the sweep can measure."""
    sizes = []
    for size, g in zip(uniform_budget_sizes(config, geometries), geometries):
        floor = part_floors(config, g)
        sizes.append(BlockSize(max(size.attention, floor.attention, min(1, g.attention_structures)),
                               max(size.mlp, floor.mlp, min(config.round_to, g.mlp_structures))))
    return sizes


def held_out_shares(count: int, ranks: Ranks) -> list[range] | None:
    """Every rank's contiguous share of the ``count`` held-out windows, in rank order; None where they are not
    split (a single process, or fewer windows than ranks: then every rank measures on all of them)."""
    if not ranks.distributed or count < ranks.world_size:
        return None
    return [dataclasses.replace(ranks, rank=r).share(count) for r in range(ranks.world_size)]


def _head_gradients(run: PruneRun, outputs: ActivationStore) -> list[torch.Tensor]:
    """The gradient of the summed next-token loss at the last block's output, per held-out batch of this rank;
    labels drawn from the pruned model's own distribution (seeded). Ranks that split the windows gather the
    outputs and draw every window's labels as one process would, then keep the gradients of their own windows."""
    ranks = run.settings.ranks
    shares = held_out_shares(run.held_out.shape[0], ranks)
    if shares is None:
        return _sampled_gradients(run, outputs)
    with step(ranks):
        local = list(outputs)
        mine = torch.cat(local)
    everything = gather_rows(mine, [len(share) for share in shares], ranks)
    grads = torch.cat(_sampled_gradients(run, list(everything.split(run.config.batch_size))))
    own = shares[ranks.rank]
    return list(grads[own.start:own.stop].split([batch.shape[0] for batch in local]))


def _sampled_gradients(run: PruneRun, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`_head_gradients` of ``batches`` (every held-out batch, in order, for the one generator)."""
    device, storage = run.settings.device, run.settings.storage_device
    modules = run.spec.head_modules(run.model)
    generator = torch.Generator().manual_seed(run.config.seed)
    grads = []
    with modules_on(modules, device):
        for hidden in batches:
            grad = torch.zeros_like(hidden, device=storage)
            chunk_positions = max(1, HEAD_TOKENS // hidden.shape[0])
            for start in range(0, hidden.shape[1], chunk_positions):
                x = hidden[:, start:start + chunk_positions].to(device).detach().requires_grad_()
                with torch.enable_grad():
                    logits = run.spec.head_logits(run.model.config, modules, x).float()
                    logits = logits.reshape(-1, logits.shape[-1])
                    with torch.no_grad():
                        labels = torch.multinomial(F.softmax(logits, -1).cpu(), 1, generator=generator).flatten()
                    loss = F.cross_entropy(logits, labels.to(device), reduction="sum")
                    (chunk,) = torch.autograd.grad(loss, x)
                grad[:, start:start + chunk_positions] = chunk.to(storage)
            grads.append(grad)
    return grads


class ConsumerMoments:
    """Token-weighted Gram of a consumer's inputs and second moment of its output gradients."""

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.weight = 0.0
        self.tokens = 0

    def add(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """Fold in a batch: one matrix product for each (float32, as the pipeline's Grams)."""
        x = x.reshape(-1, x.shape[-1]).float()
        g = g.reshape(-1, g.shape[-1]).float()
        w = g.pow(2).sum(1)
        if self.gram is None:
            self.gram = x.new_zeros(x.shape[1], x.shape[1])
            self.output = g.new_zeros(g.shape[1], g.shape[1])
        self.gram.addmm_((x * w[:, None]).T, x)
        self.output.addmm_(g.T, g)
        self.weight += float(w.double().sum())
        self.tokens += x.shape[0]

    def sum_over(self, ranks: Ranks) -> None:
        """Make these the moments of every rank's windows together (in place; the same parts on every rank)."""
        totals = torch.tensor([self.weight, float(self.tokens), float(self.gram is not None)], dtype=torch.float64)
        sum_in_place(totals, ranks)
        weight, tokens, present = totals.tolist()
        if present not in (0, ranks.world_size):
            raise RuntimeError(f"rank {ranks.rank}: a consumer's gradient reached {present:.0f} of "
                               f"{ranks.world_size} ranks")
        if present:
            sum_in_place(self.gram, ranks)
            sum_in_place(self.output, ranks)
        self.weight, self.tokens = weight, int(tokens)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token-weighted Gram with weights of mean 1, E[g g^T]), both per token."""
        mean_weight = self.weight / self.tokens if self.tokens else 1.0
        scale = self.tokens * mean_weight if mean_weight > 0 else max(self.tokens, 1)
        return self.gram / scale, self.output.double() / max(self.tokens, 1)


def _block_sensitivity(run: PruneRun, index: int, pruned: nn.Module, dense: nn.Module, inputs: ActivationStore,
                       grads: list[torch.Tensor]) -> tuple[dict[str, ConsumerMoments], list[torch.Tensor]]:
    """One step of the backward sweep: the consumers' moments, and the gradients at the block's inputs."""
    device, storage = run.settings.device, run.settings.storage_device
    kwargs = run.held_out_inputs.kwargs[index]
    moments = {part: ConsumerMoments() for part in PARTS}
    new_grads = []
    pruned_consumers, dense_consumers = block_consumers(pruned, run.spec), block_consumers(dense, run.spec)
    for b, state in enumerate(inputs):
        kw = move_to(kwargs[b], device)
        x = state.to(device).detach().requires_grad_()
        outputs: dict[str, torch.Tensor] = {}
        hooks = [module.register_forward_hook(lambda _m, _a, out, part=part: outputs.__setitem__(part, out))
                 for part, module in pruned_consumers.items()]
        try:
            with torch.enable_grad():
                y = call_block(pruned, x, kw)
        finally:
            for hook in hooks:
                hook.remove()
        parts = [p for p in PARTS if p in outputs and outputs[p].requires_grad]
        with torch.enable_grad():
            gradients = torch.autograd.grad(y, [x, *(outputs[p] for p in parts)], grad_outputs=grads[b].to(device),
                                            allow_unused=True)
        new_grads.append(gradients[0].to(storage))
        inputs_seen: dict[str, torch.Tensor] = {}
        hooks = [module.register_forward_pre_hook(lambda _m, a, part=part: inputs_seen.__setitem__(part, a[0]))
                 for part, module in dense_consumers.items()]
        try:
            with torch.no_grad():
                call_block(dense, x.detach(), kw)
        finally:
            for hook in hooks:
                hook.remove()
        for part, g in zip(parts, gradients[1:]):
            if g is not None:
                moments[part].add(inputs_seen[part], g)
    return moments, new_grads


def _curves(run: PruneRun, index: int, dense: nn.Module, moments: dict[str, ConsumerMoments]
            ) -> dict[tuple[int, str], dict[int, float]]:
    config, settings = run.config, run.settings
    geometry = run.geometries[index]
    out = {}
    consumers = block_consumers(dense, run.spec)
    floors = part_floors(config, geometry)
    layout = settings.attention_layout
    # Per part: the solver's groups per structure of the budgets (query heads: a structure is one head of every KV
    # group), the channels per solver group, the partitions, the neurons' rounding.
    for part, full, per, group, partitions, round_to in (
            ("attention", geometry.attention_structures, layout.solver_keep(1), layout.group_size, layout.partitions,
             1),
            ("mlp", geometry.mlp_structures, 1, 1, 1, config.round_to)):
        sizes = allowed_sizes(full, getattr(floors, part), round_to)
        if moments[part].tokens == 0 or len(sizes) == 1:  # a part the loss does not reach: free to remove
            out[(index, part)] = {k: 0.0 for k in sizes}
            continue
        gram, output = moments[part].result()
        step = 1 if part == "attention" else max(1, full // CURVE_POINTS)
        kept, damage = damage_curve(gram.to(settings.device), consumers[part].weight.detach().T, group_size=group,
                                    floor=min(sizes[-1], full) * per, step=step, output_gram=output.to(settings.device),
                                    damping=config.damping, dtype=PLANNING_DTYPE or settings.attention.dtype,
                                    partitions=partitions)
        out[(index, part)] = dict(zip(sizes, interpolate_curve([k // per for k in kept], damage, sizes)))
    return out


def _backward_sweep(run: PruneRun, source: BlockSource, held_inputs: list[ActivationStore], progress: bool
                    ) -> dict[tuple[int, str], dict[int, float]]:
    device, ranks = run.settings.device, run.settings.ranks
    split = held_out_shares(run.held_out.shape[0], ranks) is not None
    grads = _head_gradients(run, held_inputs[-1])
    held_inputs[-1].close()  # each store is released once the sweep has passed it
    damage: dict[tuple[int, str], dict[int, float]] = {}
    bar = tqdm(total=len(run.blocks), desc="planning: sensitivity", unit="block", disable=not progress)
    try:
        for index in reversed(range(len(run.blocks))):
            block = run.blocks[index]
            pruned = source.scratch(index).to(device)
            source.load(index, block)
            home = block_device(block)
            try:
                block.to(device)
                with step(ranks):
                    moments, grads = _block_sensitivity(run, index, pruned, block, held_inputs[index], grads)
                if split:
                    for part in PARTS:
                        moments[part].sum_over(ranks)
                damage.update(_curves(run, index, block, moments))
                held_inputs[index].close()
            finally:
                block.to(home)
                source.release(index, block)
                source.drop_scratch(index, pruned)
            bar.update(1)
    finally:
        bar.close()
    return damage
