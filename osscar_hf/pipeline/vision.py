"""A CNN's pruning run: the checks, the calibration images, the capture of block 0's inputs, and the one block loop
(:func:`osscar_hf.pipeline.orchestrate.prune_blocks`) with the CNN's block stream
(:class:`~osscar_hf.pipeline.channels.ChannelBlockStream`). In memory and on one process only (``docs/vision.md``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from ..activations import ActivationSpace
from ..arch import get_submodule
from ..arch.vision import BlockList, VisionSpec, get_vision_spec, image_channels
from ..budgets import uses_global_allocation
from ..budgets.channel_geometry import ChannelGeometry, channel_geometries
from ..budgets.channel_plan import (
    channel_goal,
    check_channel_budget,
    global_channel_widths,
    uniform_channel_widths,
)
from ..calibration_images import check_image_processor, load_held_out_images, load_images, pixel_values
from ..capture import CapturedInputs
from ..channel_surgery import consumer_ops
from ..config import OsscarConfig, keep_count
from ..conv_flops import count_multiply_adds, probe_pixels
from ..errors import OsscarConfigError, UnsupportedModelError
from ..evaluation import count_parameters
from ..io.channel_shapes import dense_channel_shapes, read_channel_shapes
from ..io.model_config import update_channel_config
from ..io.save import attach_run, pruning_record
from ..io.shapes import osscar_quantization_config
from ..methods import SolveSettings, get_method, method_names
from ..report import ChannelBlockReport, PruneReport
from .channels import ChannelBlockStream, ChannelSettings, capture_channel_inputs
from .run import InMemoryBlocks

__all__ = ["ChannelRun", "check_channel_config", "prune_channels"]

logger = logging.getLogger(__name__)

# Fields of a language model's budget, and the value that leaves them unused.
_LANGUAGE_FIELDS = {"attention_sparsity": 0.0, "mlp_sparsity": 0.0, "block_sizes": None,
                    "attention_structure": "kv_groups", "allocation_search": 0}


@dataclass
class ChannelRun:
    """One CNN pruning run: what :func:`~osscar_hf.pipeline.orchestrate.prune_blocks` reads (``blocks``, ``spec``,
    ``settings``) and what the report needs."""

    config: OsscarConfig
    model: nn.Module
    spec: VisionSpec
    settings: ChannelSettings
    pixel_values: torch.Tensor | None
    params_before: int
    multiply_adds_before: int
    started: float = field(default_factory=time.perf_counter)
    # A global ``sparsity``: every block's cost as a function of its widths, and the held-out images that OSSCAR's
    # allocation measures on (None for a uniform one).
    geometries: list[ChannelGeometry] | None = None
    held_out: torch.Tensor | None = None

    @property
    def blocks(self) -> BlockList:
        return BlockList(self.model, self.spec.block_paths(self.model))


def check_channel_config(config: OsscarConfig, spec: VisionSpec, model: nn.Module) -> None:
    """Refuse what a CNN run cannot do, naming the field and what to give instead, before any data is read."""
    config.check_method()
    given = [f"{name}={getattr(config, name)!r}" for name, unused in _LANGUAGE_FIELDS.items()
             if getattr(config, name) != unused]
    if given:
        raise OsscarConfigError(f"{', '.join(given)}: language-model budgets, but model_type "
                                f"{model.config.model_type!r} is a CNN, pruned by channel_sparsity (the fraction of "
                                "every residual block's inner channels removed) or sparsity (a global budget of "
                                "its residual blocks' parameters or FLOPs)")
    method = get_method(config.method)
    if method.adds_bias:
        accepted = [n for n in method_names() if not get_method(n).adds_bias]
        raise OsscarConfigError(f"method {config.method!r} compensates with a consumer bias, which CNN channel "
                                f"pruning does not do yet; use one of {accepted}")
    if config.dense_targets or not config.propagate:
        raise OsscarConfigError("CNN channel pruning runs with propagate=True and dense_targets=False only, got "
                                f"propagate={config.propagate}, dense_targets={config.dense_targets}")
    if config.sparsity is not None:
        return
    for path in spec.block_paths(model):
        block = get_submodule(model, path)
        for problem in spec.layout(block):
            consumer = get_submodule(block, problem.consumer)
            width = consumer_ops(consumer).width(consumer)
            if keep_count(width, config.channel_sparsity) < 1:
                raise OsscarConfigError(f"channel_sparsity={config.channel_sparsity} keeps no channel of the "
                                        f"{width} of {path}.{problem.consumer}; lower it")


def _check_model(model: nn.Module, spec: VisionSpec) -> None:
    if osscar_quantization_config(model.config) is not None or pruning_record(model) is not None:
        raise UnsupportedModelError("this model was already pruned by osscar_hf; prune the dense model instead")
    spec.check_model(model)
    if any(p.device.type == "meta" for p in model.parameters()):
        raise UnsupportedModelError("the model has parameters on the meta device; load it fully on one device")
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise UnsupportedModelError("CNN channel pruning runs in one process; distributed pruning is for language "
                                    "models only so far")


def channel_settings(config: OsscarConfig) -> ChannelSettings:
    iters = config.local_search_iters if config.local_search else 0
    solve = SolveSettings(step=config.mlp_step, swap_size=config.mlp_swap_size, local_search_iters=iters,
                          damping=config.damping, dtype=config.torch_solver_dtype())
    return ChannelSettings(method=get_method(config.method), solve=solve, channel_sparsity=config.channel_sparsity,
                           device=config.resolved_device(), storage_device=torch.device("cpu"),
                           activation_storage=config.activation_storage, activation_dir=config.activation_dir)


def start_channel_run(config: OsscarConfig, model: nn.Module, image_processor: Any) -> ChannelRun:
    """Every check, then the calibration images' pixel values (none for a method without statistics) and, for a
    global allocation, the held-out images'."""
    spec = get_vision_spec(model)
    _check_model(model, spec)
    check_channel_config(config, spec, model)
    settings = channel_settings(config)
    was_training = model.training
    model.eval()
    try:
        geometries = None
        if config.sparsity is not None:  # refused from the shapes (FLOPs: at the model's own image size)
            geometries = channel_geometries(model, spec, config.sparsity_target)
            check_channel_budget(config, geometries)
        pixels, held_out = _images(config, model, image_processor, settings)
        multiply_adds = count_multiply_adds(model, probe_pixels(model, pixels))
        if geometries is not None and config.sparsity_target == "flops":  # at the calibration images' size
            geometries = channel_geometries(model, spec, "flops", pixels)
    finally:
        model.train(was_training)
    if geometries is not None and not uses_global_allocation(config):
        settings = replace(settings, widths=tuple(uniform_channel_widths(config, geometries)))
    return ChannelRun(config=config, model=model, spec=spec, settings=settings, pixel_values=pixels,
                      params_before=count_parameters(model), multiply_adds_before=multiply_adds,
                      geometries=geometries, held_out=held_out)


def _images(config: OsscarConfig, model: nn.Module, image_processor: Any, settings: ChannelSettings
            ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Pixel values of the calibration images and of a global allocation's held-out images (None where unused)."""
    if not settings.method.statistics:
        return None, None
    check_image_processor(image_processor)
    channels = image_channels(model)
    if uses_global_allocation(config):
        images, others = load_held_out_images(config.dataset, num_samples=config.num_samples,
                                              held_out=config.allocation_samples, seed=config.seed,
                                              image_column=config.image_column)
        return (pixel_values(images, image_processor, num_channels=channels),
                pixel_values(others, image_processor, num_channels=channels))
    images = load_images(config.dataset, num_samples=config.num_samples, seed=config.seed,
                         image_column=config.image_column)
    return pixel_values(images, image_processor, num_channels=channels), None


def plan_channel_widths(run: ChannelRun, *, progress: bool = True) -> None:
    """A global allocation: measure the damage curves and set every block's widths in ``run.settings``."""
    from .channel_sensitivity import channel_damage

    started = time.perf_counter()
    damage = channel_damage(run, run.held_out, progress=progress)
    try:
        widths = global_channel_widths(run.config, run.geometries, damage)
    except ValueError as exc:  # the floors at the calibration size (the check ran at the model's own size)
        raise OsscarConfigError(f"sparsity={run.config.sparsity}: {exc}; lower the sparsity or the floors") from None
    run.settings = replace(run.settings, widths=tuple(widths))
    logger.info("OSSCAR's allocation planned in %.1f s: widths %s", time.perf_counter() - started, widths)


def prune_channels(config: OsscarConfig, model: nn.Module, image_processor: Any = None, *,
                   progress: bool = True) -> PruneReport:
    """Prune a CNN's residual blocks in place (uniform ``channel_sparsity``); return the report."""
    run = start_channel_run(config, model, image_processor)
    was_training = model.training
    model.eval()
    space = ActivationSpace.for_settings(run.settings)
    try:
        if run.geometries is not None and run.settings.widths is None:
            plan_channel_widths(run, progress=progress)
        with space, torch.no_grad():
            captured = capture_channel_inputs(run, space)
            reports = _prune_blocks(run, captured, progress)
        multiply_adds = count_multiply_adds(model, probe_pixels(model, run.pixel_values))
    except BaseException:
        if read_channel_shapes(model) != dense_channel_shapes(model.config):
            update_channel_config(model, config)  # weights and config consistent, so what is left can be saved
            logger.error("pruning stopped by an error after some blocks were pruned: the model is partially pruned, "
                         "and its config describes its blocks as they are now")
        raise
    finally:
        model.train(was_training)
    report = _report(run, reports, space.summary(), multiply_adds)
    if any(problem.solved for block in reports for problem in block.problems):
        update_channel_config(model, config)
        attach_run(model, report, config)  # save_pretrained and push_to_hub then write the model card
    return report


def _prune_blocks(run: ChannelRun, captured: CapturedInputs, progress: bool) -> list[ChannelBlockReport]:
    from .orchestrate import prune_blocks  # the one block loop

    return prune_blocks(run, InMemoryBlocks(), captured, progress=progress,  # type: ignore[arg-type]
                        description="OSSCAR channel pruning", stream=ChannelBlockStream)


def _report(run: ChannelRun, reports: list[ChannelBlockReport], activations: dict[str, Any],
            multiply_adds: int) -> PruneReport:
    config, pixels = run.config, run.pixel_values
    calibration: dict[str, Any] = {"num_samples": 0, "image_size": None}
    if pixels is not None:
        calibration = {"num_samples": int(pixels.shape[0]), "image_size": list(pixels.shape[2:])}
    from .orchestrate import run_report  # the one report of a run

    params_after = count_parameters(run.model)
    budget = {"method": config.method, "allocation": "uniform channels", "channel_sparsity": config.channel_sparsity,
              "params_before": run.params_before, "params_after": params_after,
              "multiply_adds_before": run.multiply_adds_before, "multiply_adds_after": multiply_adds}
    if run.geometries is not None:
        budget.update(_global_budget(run, reports))
        calibration["held_out_images"] = 0 if run.held_out is None else int(run.held_out.shape[0])
    return run_report(run, calibration, reports, params_after, activations, budget)


def _global_budget(run: ChannelRun, reports: list[ChannelBlockReport]) -> dict[str, Any]:
    """What a ``sparsity`` asked of the residual blocks and what they keep (in its own units)."""
    config, geometries = run.config, run.geometries
    widths = [[p.kept for p in report.problems] for report in reports]
    return {"allocation": config.resolved_allocation(), "sparsity": config.sparsity,
            "sparsity_target": config.sparsity_target,
            "blocks_before": sum(g.dense for g in geometries),
            "blocks_goal": channel_goal(config, geometries),
            "blocks_after": sum(g.cost(k) for g, k in zip(geometries, widths)),
            "widths": widths}
