"""OSSCAR's global allocation for a CNN: damage curves in units of the loss of the uniformly pruned model.

The language models' signal (:mod:`.sensitivity`, ``docs/budgets.md``), on a model small enough to hold twice:

1. **A uniform first prune** (stage A only, OSSCAR's selection, propagated) of a copy of the whole model to the
   target's uniform widths (raised to the floors), through the one block loop on the calibration images.
2. **A backward pass** through that pruned copy on the held-out images (``allocation_samples`` images of the
   dataset that are not calibration images), labels sampled from its own softmax (so the gradient's second moment
   is its Fisher information), recording every consumer's output gradient ``g`` (one row per output position);
   the **dense** block is run on the pruned copy's block inputs for the consumer's unfolded input ``x``. A consumer
   whose output channels are themselves an inner width (a bottleneck's conv2) has them uniformly pruned in the
   copy: the removed ones get no gradient (their error cannot reach the loss there), the kept ones theirs.
3. **Damage curves** (:func:`osscar_hf.solver.curves.damage_curve`): stage A on the consumer's dense weight, weighted
   by ``G = E[g g^T]`` and the gradient-energy-weighted Gram ``E[w x x^T]``, both per output position, as the
   language models' are per token (:data:`POSITION_EXPONENT`: counting every position of an image instead
   over-weights the early, high-resolution blocks, measured worse than uniform widths for a FLOPs budget).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..activations import ActivationSpace
from ..arch import get_submodule
from ..arch.vision import BlockList
from ..budgets.channel_plan import Damage, channel_floors, first_prune_widths
from ..budgets.plan import allowed_sizes
from ..channel_surgery import consumer_ops
from ..methods import get_method
from ..solver.curves import damage_curve, interpolate_curve
from .sensitivity import CURVE_POINTS, PLANNING_DTYPE, ConsumerMoments

__all__ = ["channel_damage", "first_prune"]

logger = logging.getLogger(__name__)

Key = tuple[int, int]  # (block, problem)
# A curve is multiplied by its consumer's output positions per image to this power. 0 (the default): the damage per
# output position, as the language models' curves are per token. 1 (an image's loss sums over its positions, cross
# terms left out) weighs the early, high-resolution blocks far more; measured on EfficientNet-Lite0 (first fold, 30%
# removed): held-out KL 0.54 with 0 against 0.83 with 1 (0.70 with 0.5) for parameters, and 0.35 against 2.45 (1.29)
# for FLOPs, where 1 kept the early blocks dense and starved the late ones, worse than uniform widths.
POSITION_EXPONENT = 0.0


def channel_damage(run: Any, held_out: torch.Tensor, *, progress: bool = True) -> Damage:
    """Every (block, problem)'s damage at each kept count a global allocation may choose."""
    pruned, reports = first_prune(run, first_prune_widths(run.config, run.geometries), progress=progress)
    moments = _moments(run, pruned, reports, held_out, progress)
    del pruned
    return _curves(run, moments, images=held_out.shape[0], progress=progress)


def first_prune(run: Any, widths: list[tuple[int, ...]], *, progress: bool = True) -> tuple[nn.Module, list[Any]]:
    """A copy of ``run.model`` pruned to ``widths`` by OSSCAR's stage A; the copy and its block reports."""
    from .channels import ChannelBlockStream, capture_channel_inputs
    from .orchestrate import prune_blocks
    from .run import InMemoryBlocks

    settings = run.settings
    solve = replace(settings.solve, local_search_iters=0, dtype=PLANNING_DTYPE or settings.solve.dtype)
    first = replace(settings, method=get_method("osscar"), solve=solve, widths=tuple(widths))
    scratch = replace(run, model=copy.deepcopy(run.model), settings=first)
    space = ActivationSpace.for_settings(first)
    with space, torch.no_grad():
        captured = capture_channel_inputs(scratch, space)
        reports = prune_blocks(scratch, InMemoryBlocks(), captured, progress=progress,
                               description="planning: uniform prune", stream=ChannelBlockStream)
    return scratch.model, reports


def _output_rows(consumer_rows: list[int] | None, dense_width: int, g: torch.Tensor) -> torch.Tensor:
    """``g`` (the pruned consumer's output gradient) as rows over the dense consumer's output channels, zero on
    those the first prune removed (``consumer_rows``: the kept ones; None: none removed)."""
    rows = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]) if g.dim() == 4 else g.reshape(-1, g.shape[-1])
    if consumer_rows is None:
        return rows
    full = rows.new_zeros(rows.shape[0], dense_width)
    full[:, torch.tensor(consumer_rows, device=rows.device)] = rows
    return full


def _kept_outputs(problems: tuple[Any, ...], report: Any) -> list[list[int] | None]:
    """Per problem: the output channels its consumer kept in the first prune (a later problem's kept channels
    when it produces them), None when its outputs are not an inner width."""
    kept: list[list[int] | None] = []
    for j, problem in enumerate(problems):
        later = [q for q in range(j + 1, len(problems)) if problem.consumer in problems[q].producers]
        kept.append(report.problems[later[0]].kept_indices if later else None)
    return kept


def _moments(run: Any, pruned: nn.Module, reports: list[Any], held_out: torch.Tensor, progress: bool
             ) -> dict[Key, ConsumerMoments]:
    device, spec = run.settings.device, run.spec
    paths = spec.block_paths(run.model)
    dense_blocks, pruned_blocks = BlockList(run.model, paths), BlockList(pruned, paths)
    layouts = [spec.layout(block) for block in dense_blocks]
    kept_rows = [_kept_outputs(layout, report) for layout, report in zip(layouts, reports)]
    moments = {(b, j): ConsumerMoments() for b, layout in enumerate(layouts) for j in range(len(layout))}
    generator = torch.Generator().manual_seed(run.config.seed)
    home = next(run.model.parameters()).device
    pruned.to(device).eval().requires_grad_(False)
    batches = held_out.split(run.config.batch_size)
    try:
        run.model.to(device)
        for batch in tqdm(batches, desc="planning: sensitivity", unit="batch", disable=not progress):
            inputs, grads = _pruned_gradients(pruned, pruned_blocks, layouts, batch.to(device), generator)
            for b, block in enumerate(dense_blocks):
                xs = _dense_inputs(block, layouts[b], inputs[b])
                for j, problem in enumerate(layouts[b]):
                    consumer = get_submodule(block, problem.consumer)
                    width = consumer.weight.shape[0]
                    g = _output_rows(kept_rows[b][j], width, grads[(b, j)])
                    moments[(b, j)].add(consumer_ops(consumer).rows(consumer, xs[j]), g)
    finally:
        run.model.to(home)
    return moments


def _pruned_gradients(pruned: nn.Module, blocks: BlockList, layouts: list[tuple[Any, ...]], pixels: torch.Tensor,
                      generator: torch.Generator) -> tuple[list[torch.Tensor], dict[Key, torch.Tensor]]:
    """Every block's input and every consumer's output gradient of the summed cross-entropy on labels drawn from
    the pruned model's softmax."""
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[Key, torch.Tensor] = {}
    hooks = []
    for b, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(
            lambda _m, args, b=b: inputs.__setitem__(b, args[0].detach())))
        for j, problem in enumerate(layouts[b]):
            hooks.append(get_submodule(block, problem.consumer).register_forward_hook(
                lambda _m, _a, out, key=(b, j): outputs.__setitem__(key, out)))
    try:
        with torch.enable_grad():
            logits = pruned(pixel_values=pixels.detach().clone().requires_grad_()).logits.float()
            with torch.no_grad():
                labels = torch.multinomial(F.softmax(logits, -1).cpu(), 1, generator=generator).flatten()
            loss = F.cross_entropy(logits, labels.to(logits.device), reduction="sum")
            keys = list(outputs)
            found = torch.autograd.grad(loss, [outputs[k] for k in keys], allow_unused=True)
    finally:
        for hook in hooks:
            hook.remove()
    grads = {k: (g if g is not None else torch.zeros_like(outputs[k])).detach() for k, g in zip(keys, found)}
    return [inputs[b] for b in range(len(blocks))], grads


@torch.no_grad()
def _dense_inputs(block: nn.Module, layout: tuple[Any, ...], hidden: torch.Tensor) -> list[torch.Tensor]:
    """The inputs of ``block``'s consumers (dense) when it runs on ``hidden``."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [get_submodule(block, problem.consumer).register_forward_pre_hook(
        lambda _m, args, j=j: seen.__setitem__(j, args[0])) for j, problem in enumerate(layout)]
    try:
        block(hidden)
    finally:
        for hook in hooks:
            hook.remove()
    return [seen[j] for j in range(len(layout))]


def _curves(run: Any, moments: dict[Key, ConsumerMoments], *, images: int, progress: bool) -> Damage:
    config, settings = run.config, run.settings
    dtype = PLANNING_DTYPE or settings.solve.dtype
    damage: Damage = {}
    blocks = BlockList(run.model, run.spec.block_paths(run.model))
    for (b, j), moment in tqdm(moments.items(), desc="planning: damage curves", unit="problem",
                               disable=not progress):
        geometry = run.geometries[b]
        width = geometry.widths[j]
        sizes = allowed_sizes(width, channel_floors(config, geometry)[j], config.round_to)
        if moment.weight == 0 or len(sizes) == 1:  # the loss does not reach it: free to remove
            damage[(b, j)] = {k: 0.0 for k in sizes}
            continue
        block = blocks[b]
        consumer = get_submodule(block, run.spec.layout(block)[j].consumer)
        ops = consumer_ops(consumer)
        gram, output = moment.result()
        kept, curve = damage_curve(gram.to(settings.device), ops.matrix(consumer).detach().T,
                                   group_size=ops.group_size(consumer), floor=sizes[-1],
                                   step=max(1, width // CURVE_POINTS), output_gram=output.to(settings.device),
                                   damping=config.damping, dtype=dtype)
        per_image = (moment.tokens / images) ** POSITION_EXPONENT  # output positions of one image
        damage[(b, j)] = dict(zip(sizes, (d * per_image for d in interpolate_curve(kept, curve, sizes))))
    return damage
