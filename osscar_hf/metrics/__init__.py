"""``evaluate`` metrics shipped with osscar_hf, and the evaluation texts they share with the command line.

The corpus-perplexity metric lives in ``perplexity/perplexity.py`` (a standard ``evaluate`` metric script)
and is loaded by path, so it works offline, unlike ``evaluate.load("perplexity")`` which fetches the stock
script from the Hub (and computes a mean of per-text perplexities, not the corpus number papers report):

    from osscar_hf.metrics import load_perplexity_metric
    ppl = load_perplexity_metric()
    ppl.compute(predictions=texts, model_id="path/or/id", seq_len=2048)   # or model=model, tokenizer=tok
    # {"perplexity": ..., "nll": ..., "num_tokens": ...}

or equivalently ``evaluate.load(osscar_hf.metrics.PERPLEXITY_METRIC_PATH)``. Loading the model is
:func:`osscar_hf.io.load.load_model_and_tokenizer` (also importable from here, as are ``resolve_dtype`` and
``resolve_device``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io.load import DTYPE_NAMES, load_model_and_tokenizer, resolve_device, resolve_dtype

__all__ = [
    "DTYPE_NAMES",
    "PERPLEXITY_METRIC_PATH",
    "load_perplexity_metric",
    "resolve_dtype",
    "resolve_device",
    "load_model_and_tokenizer",
    "load_eval_texts",
    "load_wikitext2_test",
    "is_wikitext2",
]

PERPLEXITY_METRIC_PATH: str = str(Path(__file__).resolve().parent / "perplexity")
"""Folder of the perplexity metric script; pass it to ``evaluate.load``."""


def load_perplexity_metric(**kwargs: Any):
    """``evaluate.load(PERPLEXITY_METRIC_PATH, **kwargs)``: the corpus-perplexity metric, loaded offline."""
    import evaluate

    return evaluate.load(PERPLEXITY_METRIC_PATH, **kwargs)


WIKITEXT2 = "wikitext2"
_WIKITEXT2_NAMES = {WIKITEXT2, "wikitext-2", "wikitext"}


def is_wikitext2(dataset: Any) -> bool:
    """Whether ``dataset`` names the WikiText-2 test split (``"wikitext2"``) rather than a file."""
    return isinstance(dataset, str) and dataset.strip().lower() in _WIKITEXT2_NAMES


def load_eval_texts(dataset: str | Path, *, text_column: str = "text") -> list[str]:
    """The texts of an evaluation set, in order, for :func:`osscar_hf.evaluation.evaluate_perplexity`.

    ``dataset`` is ``"wikitext2"`` (the WikiText-2 raw test split, from the Hub: see
    :func:`load_wikitext2_test`), or a path: a ``.parquet`` file (column ``text_column``), a ``.jsonl`` file (field
    ``text_column`` of each line), WikiText's ``wiki.*.raw`` (read as the split's rows), or any other text
    file (read whole, as one text).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a file without the text column, or with no text.
    """
    if is_wikitext2(dataset):
        return load_wikitext2_test()
    path = Path(dataset).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"evaluation data {str(dataset)!r} {what}; give {WIKITEXT2!r} or a .txt, .jsonl or .parquet file"
        )
    suffix = path.suffix.lower()
    if suffix == ".raw" and path.name.startswith("wiki."):
        texts = load_wikitext2_test(path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if text_column not in names:
            raise ValueError(f"parquet file {str(path)!r} has no column {text_column!r}; its columns are {names}")
        column = pq.read_table(path, columns=[text_column]).column(text_column).to_pylist()
        texts = ["" if t is None else str(t) for t in column]
    elif suffix == ".jsonl":
        import json

        texts = []
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get(text_column), str):
                    raise ValueError(f"{path}:{lineno} has no string field {text_column!r}")
                texts.append(record[text_column])
    else:
        texts = [path.read_text(encoding="utf-8")]
    if not any(t.strip() for t in texts):
        raise ValueError(f"evaluation data {str(path)!r} holds no text")
    return texts


def load_wikitext2_test(path: str | Path | None = None) -> list[str]:
    """The rows of the WikiText-2 (raw, v1) test split.

    ``path`` may be the split as parquet (column ``text``) or the original ``wiki.test.raw``; without it the
    Hub dataset ``wikitext`` / ``wikitext-2-raw-v1`` is loaded (a ``RuntimeError`` at once when the Hub cannot
    be reached). Join the rows with ``"\\n\\n"`` for the standard protocol
    (:func:`osscar_hf.evaluation.evaluate_perplexity` does this for a list).
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"WikiText-2 test file not found: {path}")
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return [str(t) for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()]
        # The raw file has one row per line; empty rows are written as " \n".
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        return ["" if line == " \n" else line for line in lines]
    from osscar_hf.calibration import hub_unreachable_reason

    where = "the Hugging Face Hub (dataset 'wikitext', config 'wikitext-2-raw-v1')"
    advice = "give the path of the split's wiki.test.raw or parquet file instead"
    reason = hub_unreachable_reason()
    if reason is not None:
        raise RuntimeError(f"Could not load the WikiText-2 test split from {where}: {reason}; {advice}")
    import datasets

    try:
        dataset = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:  # noqa: BLE001 - offline/hub errors come in many types
        raise RuntimeError(f"Could not load the WikiText-2 test split from {where}: {exc}; {advice}") from exc
    return list(dataset["text"])
