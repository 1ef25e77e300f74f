"""Locate the project's offline data folder for the demo (``../shared/data`` beside the repository checkout).

The folder holds the WikiText-2 test split, the State of the Union calibration text and SmolLM2's
original ``tokenizer.json`` (see ``shared/data/README.md``). It exists on the project's development machines,
which cannot reach the Hugging Face Hub; elsewhere every helper here gives ``None`` and the demo uses the Hub
or text sampled from the model (see :mod:`osscar_hf.demo.texts`). The library never reads this folder.

The environment variable ``OSSCAR_HF_SHARED_DATA`` overrides the location.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "OSSCAR_HF_SHARED_DATA"


def shared_data_dir() -> Path | None:
    """The shared data folder: ``$OSSCAR_HF_SHARED_DATA`` if set, else ``<checkout>/../shared/data`` if it
    exists, else ``None``.

    An explicitly set environment variable is returned even when the folder does not exist, so that a
    typo shows up as missing files rather than silently using another folder.
    """
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    candidate = Path(__file__).resolve().parents[2] / "shared" / "data"
    return candidate if candidate.is_dir() else None


def _existing(*parts: str) -> Path | None:
    root = shared_data_dir()
    if root is None:
        return None
    path = root.joinpath(*parts)
    return path if path.is_file() else None


def calibration_text_path() -> Path | None:
    """``calibration/state_union.txt`` (public-domain calibration text), or ``None`` when absent."""
    return _existing("calibration", "state_union.txt")


def wikitext2_test_raw_path() -> Path | None:
    """``wikitext-2-raw/wiki.test.raw`` (the original WikiText-2 raw test file), or ``None`` when absent."""
    return _existing("wikitext-2-raw", "wiki.test.raw")


def wikitext2_test_parquet_path() -> Path | None:
    """The WikiText-2 raw test split as parquet (column ``text``), or ``None`` when absent."""
    return _existing("wikitext-2-raw", "test-00000-of-00001.parquet")


def wikitext2_test_path() -> Path | None:
    """The WikiText-2 test split: the parquet file if present (rows identical to the Hub's
    ``wikitext-2-raw-v1`` test split), else the raw file, else ``None``."""
    return wikitext2_test_parquet_path() or wikitext2_test_raw_path()


def smollm2_tokenizer_path() -> Path | None:
    """SmolLM2's original ``tokenizer.json`` (with digit splitting), or ``None`` when absent."""
    return _existing("smollm2-135m", "tokenizer.json")
