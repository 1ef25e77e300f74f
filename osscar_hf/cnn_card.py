"""The model card of a pruned CNN (``image-classification``), from its own template
(``osscar_hf/model_cards/osscar_cnn_card.md``): sizes, per-block widths, calibration images, configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData

from .config import OsscarConfig
from .errors import CardError
from .methods import describe_method
from .report import ChannelBlockReport, PruneReport
from .version import __version__

__all__ = ["CNN_TEMPLATE_NAME", "build_cnn_model_card", "is_cnn_report"]

CNN_TEMPLATE_NAME = "osscar_cnn_card.md"


def is_cnn_report(report: Any) -> bool:
    """Whether ``report`` is a :class:`~osscar_hf.report.PruneReport` of a CNN (its blocks' channel problems)."""
    return isinstance(report, PruneReport) and bool(report.blocks) and isinstance(report.blocks[0], ChannelBlockReport)


def build_cnn_model_card(report: PruneReport, *, base_model: str | None, config: OsscarConfig, tags: list[str],
                         template: Path, config_dict: dict[str, Any], repo_id: str | None = None,
                         model_name: str | None = None, license: str | None = None,
                         checkpoint_format: str | None = None) -> ModelCard:
    """The card of a CNN pruned by :class:`~osscar_hf.OsscarPruner`, rendered from ``template`` (what
    :func:`osscar_hf.card.build_model_card` does for a CNN's report, with the packaged template and the run's config
    as ``config_dict``). Only the osscar format holds a pruned CNN."""
    if checkpoint_format not in (None, "osscar"):
        raise CardError(f"a pruned CNN is saved in the osscar format only, got checkpoint_format={checkpoint_format!r}")
    for name in ("channel_sparsity", "sparsity"):
        made = report.config.get(name) or (0.0 if name == "channel_sparsity" else None)
        if made != getattr(config, name):
            raise CardError(f"config.{name} = {getattr(config, name)!r} but the report was made with {made!r}: pass "
                            "the OsscarConfig of the run (pruner.config)")
    base_name = base_model.split("/")[-1] if base_model else None
    label = "OSSCAR" if config.method == "osscar" else f"osscar_hf ({config.method})"
    name = model_name or (repo_id.split("/")[-1] if repo_id else None) or \
        (f"{base_name} pruned with {label}" if base_name else f"CNN pruned with {label}")
    card_data = ModelCardData(base_model=base_model, library_name="transformers", pipeline_tag="image-classification",
                              tags=list(tags), license=license)
    return ModelCard.from_template(card_data, template_path=str(template), **_fields(report, config), model_name=name,
                                   origin=(f"[{base_model}](https://huggingface.co/{base_model})" if base_model
                                           else f"a `{report.model_type}` model"),
                                   repo_id=repo_id or "path/or/repo-id/of/this/model",
                                   processor_id=repo_id or base_model or "path/or/repo-id/of/the/processor",
                                   config_json=json.dumps(config_dict, indent=2))


def _fields(report: PruneReport, config: OsscarConfig) -> dict[str, Any]:
    blocks: list[ChannelBlockReport] = report.blocks  # type: ignore[assignment]
    before, after = report.parameters_before, report.parameters_after
    calibration = report.calibration
    size = calibration.get("image_size")
    budget = report.budget or {}
    return dict(
        method=config.method,
        method_description=describe_method(config.method),
        model_type=report.model_type,
        channel_sparsity=f"{config.channel_sparsity:g}",
        sizes=_sizes_sentence(config, budget),
        parameters_before=f"{before:,}",
        parameters_after=f"{after:,}",
        parameters_removed=f"{(before - after) / before:.1%}" if before else "0%",
        multiply_adds_before=f"{budget.get('multiply_adds_before', 0):,}",
        multiply_adds_after=f"{budget.get('multiply_adds_after', 0):,}",
        multiply_adds_removed=(f"{1 - budget['multiply_adds_after'] / budget['multiply_adds_before']:.1%}"
                               if budget.get("multiply_adds_before") else "0%"),
        channels_total=f"{sum(p.structures for b in blocks for p in b.problems):,}",
        channels_kept=f"{sum(p.kept for b in blocks for p in b.problems):,}",
        block_rows=[{"index": b.index, "widths": ", ".join(f"{p.kept} / {p.structures}" for p in b.problems)}
                    for b in blocks],
        calibration_description=_capitalised((report.config.get("dataset") or "images passed in memory").strip("<>")),
        calibration_images=calibration.get("num_samples", 0),
        image_size="x".join(str(s) for s in size) if size else None,
        calibration_seed=config.seed,
        pruning_seconds=f"{report.total_seconds:.1f}",
        osscar_version=__version__,
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
    )


def _sizes_sentence(config: OsscarConfig, budget: dict[str, Any]) -> str:
    """How the widths were chosen: one fraction of every inner width, or a global budget and its allocation."""
    if config.sparsity is None:
        return f"{config.channel_sparsity:g} of every inner width removed."
    unit = "parameters" if config.sparsity_target == "params" else "multiply-adds per image (flops)"
    how = ("OSSCAR's global allocation (every block's widths chosen from damage measured on held-out images in the "
           "uniformly pruned model)" if budget.get("allocation") == "osscar"
           else "the same fraction of every inner width")
    kept = (f" ({budget['blocks_after']:,.0f} of {budget['blocks_before']:,.0f} kept, goal "
            f"{budget['blocks_goal']:,.0f})"
            if budget.get("blocks_before") else "")
    return f"{config.sparsity:g} of the residual blocks' {unit} removed{kept}, by {how}."


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]
