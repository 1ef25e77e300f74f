"""Which texts the demo calibrates and evaluates on, so that it runs on any machine.

In order of preference:

* the project's local data (``../shared/data`` beside the checkout, or ``$OSSCAR_HF_SHARED_DATA``, see
  :mod:`osscar_hf.demo.paths`): State of the Union text for calibration, the WikiText-2 test split for evaluation;
* else the Hugging Face Hub, when it answers at once (a quick probe, no retries; ``HF_HUB_OFFLINE=1`` skips it):
  WikiText-2's train split for calibration, its test split for evaluation;
* else text sampled from the dense model itself (``OsscarConfig(dataset="self")``): calibration windows with the
  demo's seed, evaluation text from other generators and seed ``seed + 1``, so that no evaluation sample is a
  calibration one.

Each half is chosen on its own (a folder with only WikiText-2 evaluates on it and calibrates on the Hub's text or on
samples). ``--calibration`` and ``--evaluation`` choose by hand.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from osscar_hf.calibration import hub_unreachable_reason
from osscar_hf.demo import paths
from osscar_hf.self_calibration import SELF_DATASET, is_self_dataset, sample_token_windows

logger = logging.getLogger(__name__)

__all__ = ["EVALUATION_CHOICES", "HUB_CALIBRATION_DATASET", "DemoTexts", "choose_texts", "load_wikitext2_test",
           "sample_evaluation_texts"]

HUB_CALIBRATION_DATASET = "wikitext2"
EVALUATION_CHOICES = ("auto", "wikitext2", "self")
#: Sampled evaluation text is re-tokenized after decoding: sample this much more than the windows need.
_SAMPLED_EVAL_MARGIN = 1.15
_DEMO_OPTIONS = "or run `osscar-hf demo --evaluation self` (text sampled from the model)"


@dataclass(frozen=True)
class DemoTexts:
    """The demo's calibration data (an ``OsscarConfig.dataset`` value) and evaluation texts, with where they come
    from in words (for the printed table)."""

    calibration: str
    calibration_source: str
    evaluation: str  # "wikitext2" (rows in eval_rows) or "self" (sampled once the model is loaded)
    evaluation_source: str
    eval_rows: list[str] | None = None


@cache
def _hub_reason() -> str | None:
    return hub_unreachable_reason()


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (probed once per process), or None."""
    return _hub_reason()


def load_wikitext2_test() -> tuple[list[str], str]:
    """The WikiText-2 test rows and where they came from: the local copy if present, else the Hub.

    Raises:
        RuntimeError: no local copy and the Hub cannot be reached; the message names both ways out.
    """
    from osscar_hf.metrics import load_wikitext2_test as read_wikitext2

    local = paths.wikitext2_test_path()
    if local is not None:
        return read_wikitext2(local), f"WikiText-2 test split (local copy {local})"
    reason = hub_unreachable()
    if reason is not None:
        raise RuntimeError(
            f"the WikiText-2 test split is not available here: no local copy, and the Hugging Face Hub cannot be "
            f"reached ({reason}); set {paths.ENV_VAR} to a folder holding wikitext-2-raw/wiki.test.raw, "
            f"{_DEMO_OPTIONS}"
        )
    return read_wikitext2(), "WikiText-2 test split (Hugging Face Hub)"


def _choose_evaluation(evaluation: str) -> tuple[str, str, list[str] | None]:
    if evaluation not in EVALUATION_CHOICES:
        raise ValueError(f"evaluation must be one of {list(EVALUATION_CHOICES)}, got {evaluation!r}")
    if evaluation == "self":
        return "self", "text sampled from the dense model (chosen with --evaluation self)", None
    if evaluation == "wikitext2" or paths.wikitext2_test_path() is not None or hub_unreachable() is None:
        try:
            rows, source = load_wikitext2_test()
            return "wikitext2", source, rows
        except RuntimeError as exc:
            if evaluation == "wikitext2":
                raise
            logger.warning("WikiText-2 could not be loaded (%s); evaluating on text sampled from the model", exc)
            return "self", "text sampled from the dense model (WikiText-2 could not be loaded)", None
    else:
        logger.info("No local WikiText-2 and no Hub (%s): evaluating on text sampled from the model",
                    hub_unreachable())
    return "self", "text sampled from the dense model (no WikiText-2 here: no local copy, no Hub)", None


def _choose_calibration(calibration: str | None) -> tuple[str, str]:
    if calibration is not None:
        if is_self_dataset(calibration):
            return SELF_DATASET, "text sampled from the dense model (chosen with --calibration self)"
        return calibration, f"{calibration} (chosen with --calibration)"
    local = paths.calibration_text_path()
    if local is not None:
        return str(local), f"State of the Union addresses (local copy {local})"
    reason = hub_unreachable()
    if reason is None:
        return HUB_CALIBRATION_DATASET, "WikiText-2 train split (Hugging Face Hub)"
    logger.info("No local calibration text and no Hub (%s): calibrating on text sampled from the model", reason)
    return SELF_DATASET, "text sampled from the dense model (no local calibration text, no Hub)"


def choose_texts(calibration: str | None = None, evaluation: str = "auto") -> DemoTexts:
    """Pick the demo's texts (see the module docstring); WikiText-2 rows are loaded now, sampled text later."""
    evaluation_kind, evaluation_source, rows = _choose_evaluation(evaluation)
    dataset, calibration_source = _choose_calibration(calibration)
    return DemoTexts(calibration=dataset, calibration_source=calibration_source, evaluation=evaluation_kind,
                     evaluation_source=evaluation_source, eval_rows=rows)


def sample_evaluation_texts(model: torch.nn.Module, tokenizer: Any, *, windows: int, eval_seq_len: int,
                            sample_len: int, seed: int, progress: bool = True) -> list[str]:
    """Texts sampled from ``model`` for ``windows`` perplexity windows of ``eval_seq_len`` tokens: samples of
    ``sample_len`` tokens (stream ``"evaluation"``, seed ``seed``), decoded with their special tokens."""
    count = math.ceil(windows * eval_seq_len * _SAMPLED_EVAL_MARGIN / sample_len)
    ids = sample_token_windows(model, count=count, seq_len=sample_len, seed=seed, stream="evaluation",
                               progress=progress)
    return [tokenizer.decode(row, skip_special_tokens=False) for row in ids]
