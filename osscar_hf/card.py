"""Model cards for pruned models, built with ``huggingface_hub.ModelCard`` from a Jinja template.

    card = build_model_card(pruner.report, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                            config=pruner.config, repo_id="me/SmolLM2-135M-osscar",
                            eval_results={"dense": 20.1, "pruned": 24.3})
    card.save("pruned/README.md")

The template ships inside the package (``osscar_hf/model_cards/osscar_model_card.md``), so it is found
from a source checkout and from an installed wheel alike. The card's YAML metadata names the base model,
``library_name: transformers``, ``pipeline_tag: text-generation``, the tags ``osscar``, ``pruned`` and
``structured-pruning``, the calibration set when it is a Hub dataset, and the perplexities as
``model-index`` entries. ``base_model_relation`` is left unset: the Hub knows adapter, merge, quantized
and finetune only, and a pruned model is none of them.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import math
import numbers
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .calibration import HUB_DATASETS, SELF_DATASET
from .cnn_card import CNN_TEMPLATE_NAME, build_cnn_model_card, is_cnn_report
from .config import OsscarConfig
from .errors import CardError
from .io.remote_code import REMOTE_CODE_FILES, remote_model_type
from .methods import describe_method
from .report import PruneReport
from .version import __version__

__all__ = ["CHECKPOINT_FORMATS", "TAGS", "CardError", "build_model_card", "template_path"]

TAGS = ["osscar", "pruned", "structured-pruning"]
TEMPLATE_NAME = "osscar_model_card.md"
#: Values of ``build_model_card(checkpoint_format=...)``: the formats ``osscar_hf.save_pruned`` writes.
CHECKPOINT_FORMATS = ("stock", "osscar", "remote_code")

#: Keys accepted in ``eval_results`` and their defaults (WikiText-2 test, as ``evaluate_perplexity`` measures).
EVAL_DEFAULTS: dict[str, Any] = {
    "dense": None,
    "pruned": None,
    "dataset_type": "wikitext",
    "dataset_name": "WikiText-2",
    "dataset_config": "wikitext-2-raw-v1",
    "dataset_split": "test",
    "protocol": None,
}

_DEFAULT_PROTOCOL = (
    "Corpus perplexity, measured the same way for both models (`osscar_hf.evaluate_perplexity`): the "
    "{split} split joined with blank lines, tokenised once without special tokens, cut into non-overlapping "
    "windows{seq_len}, exp(mean token negative log-likelihood) over all scored tokens."
)


@contextlib.contextmanager
def template_path(name: str = TEMPLATE_NAME) -> Iterator[Path]:
    """The packaged card template ``name`` as a file path (extracted to a temporary file if the package is zipped)."""
    resource = importlib.resources.files("osscar_hf").joinpath("model_cards", name)
    if not resource.is_file():
        raise CardError(
            f"the model card template osscar_hf/model_cards/{name} is missing from this installation; "
            "reinstall osscar-hf (the template is package data)"
        )
    with importlib.resources.as_file(resource) as path:
        yield Path(path)


def build_model_card(
    report: PruneReport,
    *,
    base_model: str | None,
    config: OsscarConfig,
    eval_results: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    tokenizer_id: str | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    template: str | os.PathLike | None = None,
    checkpoint_format: str | None = None,
) -> ModelCard:
    """Build the model card of a model pruned by :class:`~osscar_hf.OsscarPruner`.

    Args:
        report: ``pruner.report`` of the run.
        base_model: Hub id of the dense model that was pruned (``None`` if it is not on the Hub).
        config: the run's ``OsscarConfig``; must agree with ``report`` (same sparsities).
        eval_results: perplexities measured on one protocol, e.g. ``{"dense": 20.1, "pruned": 24.3}``;
            values may be floats, ``PerplexityResult``s or dicts with a ``"perplexity"`` key. Optional keys
            ``dataset_type``, ``dataset_name``, ``dataset_config``, ``dataset_split`` (default WikiText-2
            test) and ``protocol`` (free text) describe the measurement. Written as ``model-index``.
        repo_id: where the model will live, used in the loading snippet (default a placeholder).
        model_name: the card's title and ``model-index`` name (default: the repo name, or
            "<base model> pruned with OSSCAR").
        tokenizer_id: where to load the tokenizer from in the snippet (default ``repo_id``).
        license, language: card metadata, passed through.
        template: another Jinja template file to render instead of the packaged one.
        checkpoint_format: how the checkpoint is saved, which decides the loading instructions:
            ``"remote_code"`` (``trust_remote_code=True``, no osscar_hf needed), ``"stock"`` (vanilla
            transformers), ``"osscar"`` or ``None`` (unknown: the instructions that work for both stock and
            osscar checkpoints, ``import osscar_hf`` first).

    Returns:
        A ``huggingface_hub.ModelCard``; ``card.save(path)`` or ``card.push_to_hub(repo_id)`` write it.
    """
    if is_cnn_report(report):
        return _cnn_card(report, config, eval_results, template, tokenizer_id, language, base_model=base_model,
                         repo_id=repo_id, model_name=model_name, license=license, checkpoint_format=checkpoint_format)
    _check_card_inputs(report, config, checkpoint_format)
    repo_name = repo_id.split("/")[-1] if repo_id else None
    base_name = base_model.split("/")[-1] if base_model else None
    label = "OSSCAR" if config.method == "osscar" else f"osscar_hf ({config.method})"
    name = model_name or repo_name or (f"{base_name} pruned with {label}" if base_name else f"model pruned with {label}")
    evaluation, eval_entries = _evaluation(eval_results)
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(TAGS),
        datasets=_hub_datasets(config.dataset),
        license=license,
        language=language,
        model_name=name if eval_entries else None,
        eval_results=eval_entries or None,
    )
    kwargs = dict(
        model_name=name,
        origin=(f"[{base_model}](https://huggingface.co/{base_model})" if base_model
                else f"a `{report.model_type}` model"),
        model_type=report.model_type,
        checkpoint_format=checkpoint_format,
        remote_model_type=remote_model_type(report.model_type),
        remote_code_files=list(REMOTE_CODE_FILES),
        repo_id=repo_id or "path/or/repo-id/of/this/model",
        tokenizer_id=tokenizer_id or repo_id or base_model or "path/or/repo-id/of/the/tokenizer",
        evaluation=evaluation,
        **_size_fields(report, config),
        **_run_fields(report, config),
    )
    if template is not None:
        path = Path(template)
        if not path.is_file():
            raise CardError(f"model card template {str(path)!r} does not exist")
        return ModelCard.from_template(card_data, template_path=str(path), **kwargs)
    with template_path() as path:
        return ModelCard.from_template(card_data, template_path=str(path), **kwargs)


# --------------------------------------------------------------------------- helpers
def _cnn_card(report: PruneReport, config: OsscarConfig, eval_results: Any, template: Any, tokenizer_id: Any,
              language: Any, **card_args: Any) -> ModelCard:
    """A pruned CNN's card (:mod:`osscar_hf.cnn_card`), from its own packaged template."""
    if not isinstance(config, OsscarConfig):
        raise CardError(f"config must be an OsscarConfig, got {type(config).__name__}")
    if eval_results is not None or template is not None or tokenizer_id is not None or language is not None:
        raise CardError("a pruned CNN's card takes no eval_results, template, tokenizer_id or language yet")
    with template_path(CNN_TEMPLATE_NAME) as path:
        return build_cnn_model_card(report, config=config, tags=TAGS, template=path,
                                    config_dict=_config_for_card(config, report)[0], **card_args)


def _check_card_inputs(report: PruneReport, config: OsscarConfig, checkpoint_format: str | None) -> None:
    if not isinstance(report, PruneReport):
        raise CardError(f"report must be a PruneReport (pruner.report), got {type(report).__name__}")
    if not isinstance(config, OsscarConfig):
        raise CardError(f"config must be an OsscarConfig, got {type(config).__name__}")
    _check_consistent(report, config)
    if not report.blocks:
        raise CardError("the report lists no blocks: was the model pruned?")
    if checkpoint_format is not None and checkpoint_format not in CHECKPOINT_FORMATS:
        raise CardError(
            f"checkpoint_format must be None or one of {list(CHECKPOINT_FORMATS)}, got {checkpoint_format!r}"
        )


def _size_fields(report: PruneReport, config: OsscarConfig) -> dict[str, Any]:
    """The template's fields on sizes: parameters, structures kept, every block's shape."""
    removed = report.parameters_before - report.parameters_after
    budget = report.budget or {}
    before = int(budget.get("block_params_before", 0))
    after = int(budget.get("block_params_after", 0))
    return dict(
        attention_unit=("query heads (the same number in every KV group)"
                        if config.attention_structure == "query_heads" else "heads (or KV groups)"),
        parameters_before=f"{report.parameters_before:,}",
        parameters_after=f"{report.parameters_after:,}",
        parameters_removed=f"{removed / report.parameters_before:.1%}" if report.parameters_before else "0%",
        sizes_description=_describe_sizes(config, report),
        block_params_before=f"{before:,}" if before else None,
        block_params_after=f"{after:,}",
        block_params_removed=f"{1 - after / before:.1%}" if before else None,
        attention_total=f"{sum(b.attention.structures for b in report.blocks):,}",
        attention_kept=f"{sum(b.attention.kept for b in report.blocks):,}",
        mlp_total=f"{sum(b.mlp.structures for b in report.blocks):,}",
        mlp_kept=f"{sum(b.mlp.kept for b in report.blocks):,}",
        block_rows=[
            {"index": b.index, "attention_kept": b.attention.kept, "attention_total": b.attention.structures,
             "mlp_kept": b.mlp.kept, "mlp_total": b.mlp.structures}
            for b in report.blocks
        ],
    )


def _run_fields(report: PruneReport, config: OsscarConfig) -> dict[str, Any]:
    """The template's fields on the run: method, calibration, config and versions."""
    calibration = report.calibration
    config_dict, described = _config_for_card(config, report)
    return dict(
        method=config.method,
        method_description=describe_method(config.method),
        calibration_description=_describe_calibration(config.dataset, report, config),
        calibration_windows=calibration.get("num_samples", config.num_samples),
        calibration_seq_len=calibration.get("seq_len", config.seq_len),
        calibration_tokens=f"{calibration.get('tokens', 0):,}",
        calibration_seed=config.seed,
        pruning_seconds=f"{report.total_seconds:.1f}",
        config_json=json.dumps(config_dict, indent=2),
        dataset_described=described,
        osscar_version=__version__,
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
    )


def _check_consistent(report: PruneReport, config: OsscarConfig) -> None:
    for key in ("attention_sparsity", "mlp_sparsity", "sparsity", "method", "seed"):
        if key in report.config and report.config[key] != getattr(config, key):
            raise CardError(
                f"config.{key} = {getattr(config, key)!r} but the report was made with {report.config[key]!r}: "
                "pass the OsscarConfig of the run that produced the report (pruner.config)"
            )


def _number(value: float) -> str:
    return f"{value:g}"


def _describe_sizes(config: OsscarConfig, report: PruneReport) -> str:
    """How every block's sizes were chosen, in words."""
    if config.block_sizes is not None:
        return "every block's kept sizes were given explicitly (see the per-block table)"
    if config.sparsity is None:
        return (f"uniform, {_number(config.attention_sparsity)} of the attention {'structures'} and "
                f"{_number(config.mlp_sparsity)} of the FFN neurons removed in every block")
    what = "parameters" if config.sparsity_target == "params" else "multiply-adds per token"
    allocation = (report.budget or {}).get("allocation") or config.resolved_allocation()
    how = {"uniform": "the same fraction in every block",
           "osscar": "chosen per block and between attention and MLP from damage measured on held-out calibration "
                     "windows",
           "flap": "chosen by FLAP's global ranking of standardised fluctuation scores"}.get(allocation, allocation)
    search = (report.budget or {}).get("allocation_search")
    if search:
        how += (f", then refined by a search of {search['candidates']} candidate exchanges between blocks evaluated as "
                f"whole models ({search['accepted']} taken, the plan after {search['chosen']} of them chosen on validation "
                f"windows; held-out KL from the dense model {search['kl_plan']:.4f} -> {search['kl_searched']:.4f})")
    return f"a global budget, {_number(config.sparsity)} of the decoder blocks' {what} removed, {how}"


def _hub_datasets(dataset: Any) -> list[str] | None:
    if isinstance(dataset, str) and dataset in HUB_DATASETS:
        return [HUB_DATASETS[dataset].path]
    return None


def _describe_calibration(dataset: Any, report: PruneReport, config: OsscarConfig) -> str:
    if isinstance(dataset, str) and dataset in HUB_DATASETS:
        hub = HUB_DATASETS[dataset]
        parts = [f"config `{hub.name}`"] if hub.name else []
        if hub.data_files:
            parts.append(f"file `{hub.data_files}`")
        parts.append(f"{hub.split} split, column `{hub.column}`")
        return f"[{hub.path}](https://huggingface.co/datasets/{hub.path}) ({', '.join(parts)})"
    sampled = report.calibration.get("sampled_from_model")
    if dataset == SELF_DATASET and sampled:
        return (f"No calibration data: text sampled from the dense model itself (`dataset=\"self\"`: each window "
                f"starts at token {sampled['start_token_id']}, temperature {sampled['temperature']:g}, top-p "
                f"{sampled['top_p']:g})")
    if isinstance(dataset, (str, os.PathLike)):
        return f"The local file `{Path(dataset).name}` (column `{config.text_column}` where it has columns)"
    described = report.config.get("dataset")
    if not described:
        return "Calibration data passed in memory"
    described = described.strip("<>")
    return described[:1].upper() + described[1:]


def _config_for_card(config: OsscarConfig, report: PruneReport) -> tuple[dict[str, Any], bool]:
    """``config.to_dict()`` without the fields that never change the result (where activations were kept, a
    machine's paths); in-memory calibration data (texts, token ids) is replaced by a description."""
    neutral = set(getattr(type(config), "RESULT_NEUTRAL_FIELDS", ()))
    data = {key: value for key, value in config.to_dict().items() if key not in neutral}
    dataset = data.get("dataset")
    if dataset is None or isinstance(dataset, str):
        return data, False
    data["dataset"] = report.config.get("dataset") or "<in-memory calibration data>"
    return data, True


def _perplexity(key: str, value: Any) -> tuple[float, int | None]:
    """The perplexity (and window length, when known) of an ``eval_results`` entry."""
    seq_len = None
    if isinstance(value, Mapping):
        seq_len = value.get("seq_len")
        value = value.get("perplexity")
    elif hasattr(value, "perplexity"):
        seq_len = getattr(value, "seq_len", None)
        value = value.perplexity
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 1.0:
        raise CardError(
            f"eval_results[{key!r}] must be a perplexity (a finite number >= 1), a PerplexityResult or a dict "
            f"with a 'perplexity' key; got {value!r}"
        )
    return float(value), seq_len


def _evaluation(eval_results: Mapping[str, Any] | None) -> tuple[dict[str, Any] | None, list[EvalResult]]:
    if eval_results is None:
        return None, []
    if not isinstance(eval_results, Mapping):
        raise CardError(f"eval_results must be a dict, got {type(eval_results).__name__}")
    unknown = sorted(set(eval_results) - set(EVAL_DEFAULTS))
    if unknown:
        raise CardError(f"unknown eval_results keys {unknown}; accepted keys are {sorted(EVAL_DEFAULTS)}")
    values = {**EVAL_DEFAULTS, **eval_results}
    if values["pruned"] is None:
        raise CardError("eval_results needs 'pruned': the perplexity of the pruned model")
    pruned, seq_pruned = _perplexity("pruned", values["pruned"])
    dense, seq_dense = _perplexity("dense", values["dense"]) if values["dense"] is not None else (None, None)
    if seq_pruned is not None and seq_dense is not None and seq_pruned != seq_dense:
        raise CardError(
            f"the dense and pruned perplexities were measured with different windows ({seq_dense} vs {seq_pruned} "
            "tokens): measure both with the same protocol"
        )
    for key in ("dataset_type", "dataset_name", "dataset_split"):
        if not isinstance(values[key], str) or not values[key]:
            raise CardError(f"eval_results[{key!r}] must be a non-empty str, got {values[key]!r}")
    seq_len = seq_pruned or seq_dense
    protocol = values["protocol"] or _DEFAULT_PROTOCOL.format(
        split=values["dataset_split"], seq_len=f" of {seq_len} tokens" if seq_len else ""
    )
    common = dict(
        task_type="text-generation", task_name="Text Generation", dataset_type=values["dataset_type"],
        dataset_name=values["dataset_name"], dataset_config=values["dataset_config"],
        dataset_split=values["dataset_split"], metric_type="perplexity",
    )
    entries = [EvalResult(**common, metric_value=round(pruned, 4), metric_name="Perplexity")]
    if dense is not None:
        entries.append(EvalResult(**common, metric_value=round(dense, 4),
                                  metric_name="Perplexity of the dense base model (reference)",
                                  metric_config="dense-base-model"))
    label = values["dataset_name"] + (f" {values['dataset_split']}" if values["dataset_split"] else "")
    evaluation = {
        "protocol": protocol,
        "dataset_label": label,
        "pruned": f"{pruned:.2f}",
        "dense": None if dense is None else f"{dense:.2f}",
    }
    return evaluation, entries
