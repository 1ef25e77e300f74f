"""Calibration data: load texts or token ids and cut them into fixed-length windows.

The main entry point is :func:`build_calibration_windows`, which returns a ``(num_samples, seq_len)``
LongTensor of input ids. Texts are joined with ``"\\n\\n"`` and tokenized once, then ``num_samples``
window starts are drawn uniformly (with replacement) from ``[0, n_tokens - seq_len]`` by a
``torch.Generator`` seeded with ``seed``: the same inputs and seed always give the same windows.

Accepted ``dataset`` values:

* a list of str (texts);
* a path (str or ``os.PathLike``) to a ``.txt`` file (the whole file is one text), a ``.jsonl`` file (one
  JSON object per line, text in field ``text_column``) or a ``.parquet`` file (column ``text_column``);
* a ``datasets.Dataset`` (column ``text_column``);
* pre-tokenized input ids, a 2-D integer tensor or a list of lists of int: each row is one window (see
  :func:`build_calibration_windows` for how rows are cut and sampled); no tokenizer is needed;
* one of the names in :data:`HUB_DATASETS` (``"c4"``, ``"wikitext2"``, ``"ptb"``), loaded with
  ``datasets.load_dataset``. When the Hub cannot be reached (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``
  set, or a quick connection probe fails) a ``CalibrationDataError`` is raised at once.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from osscar_hf.errors import CalibrationDataError

logger = logging.getLogger(__name__)

__all__ = [
    "HUB_DATASETS", "SUPPORTED_EXTENSIONS", "build_calibration_windows", "build_window_sets", "check_dataset_source",
    "hub_unreachable_reason", "load_calibration_tokens",
]

#: ``dataset="self"``: windows sampled from the model being pruned (:mod:`osscar_hf.self_calibration`).
SELF_DATASET = "self"

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet")
HUB_PROBE_TIMEOUT_S = 3.0
TEXT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class _HubDataset:
    path: str
    name: str | None
    split: str
    column: str
    data_files: str | None = None
    revision: str | None = None


#: Calibration sets known by name, resolved through ``datasets.load_dataset``.
HUB_DATASETS: dict[str, _HubDataset] = {
    "c4": _HubDataset("allenai/c4", None, "train", "text", data_files="en/c4-train.00000-of-01024.json.gz"),
    "wikitext2": _HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text"),
    # The PTB repository is script-based, which datasets >= 4 cannot run: read the Hub's parquet conversion.
    "ptb": _HubDataset("ptb-text-only/ptb_text_only", "penn_treebank", "train", "sentence",
                       revision="refs/convert/parquet"),
}

_LOCAL_HINT = (
    "pass local text instead: a list of strings, or a path to a .txt, .jsonl or .parquet file "
    "(for example the dataset= field of OsscarConfig)"
)


# --------------------------------------------------------------------------- public API
def load_calibration_tokens(
    dataset: Any, tokenizer: Any, *, text_column: str = "text"
) -> torch.Tensor | list[torch.Tensor]:
    """Load ``dataset`` as token ids.

    Returns a 1-D LongTensor (the token stream) for text inputs: the texts joined with ``"\\n\\n"`` and
    tokenized once with ``add_special_tokens=False`` (no BOS/EOS is inserted: windows are cut at random
    positions of the stream, where a BOS would not be seen in running text either). For pre-tokenized
    inputs it returns the rows as a list of 1-D LongTensors (rows may differ in length) and ignores the
    tokenizer.
    """
    rows = _as_token_rows(dataset)
    if rows is not None:
        return rows
    texts = _load_texts(dataset, text_column)
    return _tokenize(texts, tokenizer)


def build_calibration_windows(
    dataset: Any,
    tokenizer: Any,
    *,
    num_samples: int,
    seq_len: int,
    seed: int,
    text_column: str = "text",
) -> torch.LongTensor:
    """Return ``num_samples`` calibration windows of ``seq_len`` tokens, a ``(num_samples, seq_len)`` LongTensor.

    Text inputs: window starts are drawn uniformly from ``[0, n_tokens - seq_len]`` with
    ``torch.Generator().manual_seed(seed)``; each window is a contiguous slice of the token stream.

    Pre-tokenized inputs: each row is one window; rows longer than ``seq_len`` keep their first ``seq_len``
    tokens, a shorter row is an error. With more rows than ``num_samples``, ``num_samples`` rows are drawn
    without replacement (seeded; kept in their original order); with fewer, all rows are used and a warning
    is logged, so the result then has fewer than ``num_samples`` rows.

    Raises ``CalibrationDataError`` for data that cannot be loaded or is too small.
    """
    windows, _ = build_window_sets(dataset, tokenizer, num_samples=num_samples, seq_len=seq_len, seed=seed,
                                   held_out=0, text_column=text_column)
    return windows


def build_window_sets(
    dataset: Any,
    tokenizer: Any,
    *,
    num_samples: int,
    seq_len: int,
    seed: int,
    held_out: int,
    text_column: str = "text",
) -> tuple[torch.LongTensor, torch.LongTensor | None]:
    """The calibration windows of :func:`build_calibration_windows` (the same ones) and ``held_out`` more windows of
    the same data that overlap none of them (None when ``held_out`` is 0): text windows drawn with the same
    generator after the calibration ones, or rows of pre-tokenized data that calibration did not use.

    Raises ``CalibrationDataError`` when the data is too small for the held-out windows too.
    """
    num_samples = _check_int("num_samples", num_samples, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    seed = _check_int("seed", seed, 0)
    held_out = _check_int("held_out", held_out, 0)
    generator = torch.Generator().manual_seed(seed)

    rows = _as_token_rows(dataset)
    if rows is not None:
        return _windows_from_rows(rows, num_samples=num_samples, seq_len=seq_len, generator=generator,
                                  held_out=held_out)

    texts = _load_texts(dataset, text_column)
    stream = _tokenize(texts, tokenizer)
    n_tokens = stream.numel()
    if n_tokens < seq_len:
        raise CalibrationDataError(
            f"the calibration text has {n_tokens} tokens but one window needs seq_len={seq_len} tokens; "
            f"use a smaller seq_len (at most {n_tokens}) or more text"
        )
    starts = torch.randint(0, n_tokens - seq_len + 1, (num_samples,), generator=generator)
    offsets = torch.arange(seq_len)
    windows = stream[starts[:, None] + offsets[None, :]]
    logger.info(
        "calibration: %d windows of %d tokens from a stream of %d tokens (seed %d)",
        num_samples,
        seq_len,
        n_tokens,
        seed,
    )
    if not held_out:
        return windows, None
    taken = [int(s) for s in starts]
    chosen: list[int] = []
    for _ in range(200 * held_out):
        start = int(torch.randint(0, n_tokens - seq_len + 1, (1,), generator=generator))
        if all(start + seq_len <= other or start >= other + seq_len for other in taken):
            chosen.append(start)
            taken.append(start)
            if len(chosen) == held_out:
                break
    else:
        raise CalibrationDataError(
            f"the calibration text ({n_tokens} tokens) is too small for {held_out} held-out windows of {seq_len} "
            f"tokens that overlap none of the {num_samples} calibration windows: give more text, or fewer "
            "allocation_samples or num_samples"
        )
    return windows, stream[torch.tensor(chosen)[:, None] + offsets[None, :]]


# --------------------------------------------------------------------------- helpers
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise CalibrationDataError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _as_token_rows(dataset: Any) -> list[torch.Tensor] | None:
    """Rows of pre-tokenized ids as 1-D LongTensors, or None when ``dataset`` is not token ids."""
    if isinstance(dataset, torch.Tensor):
        if dataset.ndim != 2 or dataset.is_floating_point() or dataset.is_complex() or dataset.dtype == torch.bool:
            raise CalibrationDataError(
                "token ids given as a tensor must be a 2-D integer tensor (num_rows, seq_len), got shape "
                f"{tuple(dataset.shape)} and dtype {dataset.dtype}"
            )
        if dataset.shape[0] == 0:
            raise CalibrationDataError("token ids tensor has no rows; give at least one row of token ids")
        rows = list(dataset.detach().to("cpu", torch.long))
    elif isinstance(dataset, (list, tuple)) and dataset and all(isinstance(r, (list, tuple)) for r in dataset):
        for i, row in enumerate(dataset):
            if not all(_is_int(t) for t in row):
                bad = next(t for t in row if not _is_int(t))
                raise CalibrationDataError(
                    f"token ids row {i} must hold only ints, found {bad!r} ({type(bad).__name__})"
                )
        rows = [torch.tensor([int(t) for t in row], dtype=torch.long) for row in dataset]
    else:
        return None
    for i, row in enumerate(rows):
        if row.numel() and int(row.min()) < 0:
            raise CalibrationDataError(f"token ids must be >= 0, row {i} has {int(row.min())}")
    return rows


def _windows_from_rows(
    rows: list[torch.Tensor], *, num_samples: int, seq_len: int, generator: torch.Generator, held_out: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    for i, row in enumerate(rows):
        if row.numel() < seq_len:
            raise CalibrationDataError(
                f"pre-tokenized row {i} has {row.numel()} tokens but seq_len={seq_len}; every row needs at "
                "least seq_len tokens (longer rows are cut), so use a smaller seq_len or longer rows"
            )
    order = list(range(len(rows)))
    if len(rows) > num_samples:
        order = torch.randperm(len(rows), generator=generator).tolist()
        chosen = sorted(order[:num_samples])
    else:
        chosen = order
        if len(rows) < num_samples:
            logger.warning(
                "only %d pre-tokenized rows were given for num_samples=%d: using all %d rows",
                len(rows),
                num_samples,
                len(rows),
            )
    windows = torch.stack([rows[i][:seq_len] for i in chosen]).to(torch.long)
    if not held_out:
        return windows, None
    rest = sorted(order[num_samples:num_samples + held_out])
    if len(rest) < held_out:
        raise CalibrationDataError(
            f"{len(rows)} pre-tokenized rows leave {len(rest)} for {held_out} held-out windows after the "
            f"{len(chosen)} calibration rows: give more rows, or fewer allocation_samples or num_samples")
    return windows, torch.stack([rows[i][:seq_len] for i in rest]).to(torch.long)


def check_dataset_source(dataset: Any) -> None:
    """Refuse, without reading any data, a ``dataset`` that names a file or a Hub dataset that cannot be used.

    Cheap checks only (run before a model is loaded): a path must be an existing file with a supported
    extension; a name must be one of :data:`HUB_DATASETS`, and the Hub must look reachable; ``"self"`` (text
    sampled from the model) is always accepted. Other values (lists, tensors, ``datasets.Dataset``) are checked
    when they are read. Raises ``CalibrationDataError``.
    """
    if isinstance(dataset, (str, os.PathLike)):
        _named_source(dataset)


def _named_source(dataset: str | os.PathLike) -> str:
    """What a dataset given by name or path is, ``"self"``, ``"file"`` or ``"hub"``, once checked as above."""
    if dataset == SELF_DATASET:
        return "self"
    if isinstance(dataset, os.PathLike) or os.path.exists(dataset):
        _check_file(Path(dataset))
        return "file"
    if dataset in HUB_DATASETS:
        _check_hub_reachable(dataset)
        return "hub"
    names = ", ".join(repr(n) for n in HUB_DATASETS)
    if _looks_like_path(dataset):
        raise CalibrationDataError(
            f"calibration file {dataset!r} does not exist; give an existing .txt, .jsonl or .parquet "
            f"file, or one of the dataset names {names}"
        )
    raise CalibrationDataError(
        f"dataset {dataset!r} is neither an existing file nor a known dataset name; known names: {names}; "
        "or give a path to a .txt, .jsonl or .parquet file, or a list of strings"
    )


def _load_texts(dataset: Any, text_column: str) -> list[str]:
    if isinstance(dataset, (str, os.PathLike)):
        kind = _named_source(dataset)
        if kind == "self":
            raise CalibrationDataError(
                "dataset 'self' is text sampled from the model being pruned, which needs the model: use "
                "OsscarPruner(OsscarConfig(dataset='self')).prune(model) or "
                "osscar_hf.self_calibration.sample_token_windows(model, ...)"
            )
        return _texts_from_hub(dataset) if kind == "hub" else _texts_from_path(Path(dataset), text_column)
    if isinstance(dataset, (list, tuple)):
        if not dataset:
            raise CalibrationDataError("the calibration dataset is an empty list; give at least one text")
        bad = [i for i, t in enumerate(dataset) if not isinstance(t, str)]
        if bad:
            raise CalibrationDataError(
                "a calibration list must hold only str (texts) or only lists of int (token ids); items "
                f"{bad[:10]} are {type(dataset[bad[0]]).__name__}, not str"
            )
        return _check_texts(list(dataset), "the list of texts")
    if _is_module_instance(dataset, "datasets", "DatasetDict"):
        raise CalibrationDataError(
            f"got a datasets.DatasetDict with splits {list(dataset.keys())}; pass one split, e.g. dataset['train']"
        )
    if _is_module_instance(dataset, "datasets", "Dataset"):
        if text_column not in dataset.column_names:
            raise CalibrationDataError(
                f"the datasets.Dataset has no column text_column={text_column!r}; its columns are "
                f"{dataset.column_names}"
            )
        return _check_texts(_str_column(dataset[text_column], f"column {text_column!r}"), "the datasets.Dataset")
    raise CalibrationDataError(
        f"unsupported calibration dataset of type {type(dataset).__name__}; accepted: a list of str, a path to a "
        ".txt/.jsonl/.parquet file, a datasets.Dataset, token ids (2-D integer tensor or list of lists of "
        f"int), or one of the names {', '.join(repr(n) for n in HUB_DATASETS)}"
    )


def _is_module_instance(obj: Any, module: str, name: str) -> bool:
    # Only look at `datasets` when the caller already imported it (an instance implies it is imported).
    mod = sys.modules.get(module)
    return mod is not None and isinstance(obj, getattr(mod, name))


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or Path(text).suffix != ""


def _str_column(values: Any, where: str) -> list[str]:
    out = []
    for i, value in enumerate(values):
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise CalibrationDataError(f"{where} row {i} is a {type(value).__name__}, expected str")
        out.append(value)
    return out


def _check_texts(texts: list[str], where: str) -> list[str]:
    if not any(t.strip() for t in texts):
        raise CalibrationDataError(
            f"{where} holds no text ({len(texts)} empty or whitespace-only strings); give non-empty text"
        )
    return texts


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CalibrationDataError(
            f"calibration file {str(path)!r} does not exist; give an existing .txt, .jsonl or .parquet file"
        )
    if path.is_dir():
        raise CalibrationDataError(
            f"calibration path {str(path)!r} is a directory; give a .txt, .jsonl or .parquet file"
        )
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise CalibrationDataError(
            f"calibration file {str(path)!r} has unsupported extension {suffix or '(none)'!r}; accepted: "
            f"{', '.join(SUPPORTED_EXTENSIONS)}"
        )


def _texts_from_path(path: Path, text_column: str) -> list[str]:
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        texts = [path.read_text(encoding="utf-8")]
    elif suffix == ".jsonl":
        texts = _texts_from_jsonl(path, text_column)
    else:
        texts = _texts_from_parquet(path, text_column)
    logger.info("calibration: read %d text(s) from %s", len(texts), path)
    return _check_texts(texts, f"calibration file {str(path)!r}")


def _texts_from_jsonl(path: Path, text_column: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationDataError(f"{path}:{lineno} is not valid JSON: {exc}") from None
            if not isinstance(record, dict) or text_column not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise CalibrationDataError(
                    f"{path}:{lineno} has no field text_column={text_column!r} (found {keys}); each line must "
                    f"be a JSON object with a {text_column!r} string"
                )
            value = record[text_column]
            if not isinstance(value, str):
                raise CalibrationDataError(
                    f"{path}:{lineno} field {text_column!r} is a {type(value).__name__}, expected str"
                )
            texts.append(value)
    return texts


def _texts_from_parquet(path: Path, text_column: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError on a bad file
        raise CalibrationDataError(f"cannot read parquet file {str(path)!r}: {exc}") from exc
    if text_column not in schema.names:
        raise CalibrationDataError(
            f"parquet file {str(path)!r} has no column text_column={text_column!r}; its columns are {schema.names}"
        )
    table = pq.read_table(path, columns=[text_column])
    return _str_column(table.column(text_column).to_pylist(), f"parquet column {text_column!r}")


# --------------------------------------------------------------------------- the Hub
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_endpoint() -> str:
    endpoint = os.environ.get("HF_ENDPOINT")
    if not endpoint:
        try:
            from huggingface_hub import constants

            endpoint = constants.ENDPOINT
        except Exception:  # pragma: no cover - huggingface_hub is a dependency
            endpoint = "https://huggingface.co"
    return endpoint


def hub_unreachable_reason() -> str | None:
    """Why the Hub cannot be reached, or None when it looks reachable.

    Checks the offline environment variables, then opens a TCP connection to the endpoint host in a
    daemon thread, waiting at most ``HUB_PROBE_TIMEOUT_S`` (DNS lookups have no timeout of their own).
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_true(var):
            return f"{var} is set"
    endpoint = _hub_endpoint()
    parsed = urlparse(endpoint)
    host = parsed.hostname
    if not host:
        return f"HF_ENDPOINT {endpoint!r} has no host"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result: dict[str, BaseException | None] = {}

    def probe() -> None:
        import socket

        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            result["error"] = None
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            result["error"] = exc

    thread = threading.Thread(target=probe, name="osscar-hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 0.5)
    if "error" not in result:
        return f"no answer from {host}:{port} within {HUB_PROBE_TIMEOUT_S:g} s"
    if result["error"] is not None:
        return f"cannot connect to {host}:{port} ({result['error']})"
    return None


def _check_hub_reachable(name: str) -> None:
    reason = hub_unreachable_reason()
    if reason is not None:
        raise CalibrationDataError(
            f"calibration dataset {name!r} ({HUB_DATASETS[name].path}) needs the Hugging Face Hub, which cannot "
            f"be reached ({reason}); {_LOCAL_HINT}"
        )


def _texts_from_hub(name: str) -> list[str]:
    spec = HUB_DATASETS[name]
    import datasets

    kwargs: dict[str, Any] = {"split": spec.split}
    if spec.data_files is not None:
        kwargs["data_files"] = spec.data_files
    if spec.revision is not None:
        kwargs["revision"] = spec.revision
    args = (spec.path,) if spec.name is None else (spec.path, spec.name)
    logger.info("calibration: loading %r from the Hub (%s)", name, ", ".join(map(str, args)))
    try:
        ds = datasets.load_dataset(*args, **kwargs)
    except Exception as exc:
        raise CalibrationDataError(
            f"could not load calibration dataset {name!r} ({spec.path}) from the Hub: {exc}; {_LOCAL_HINT}"
        ) from exc
    if spec.column not in ds.column_names:
        raise CalibrationDataError(
            f"calibration dataset {name!r} has no column {spec.column!r}; its columns are {ds.column_names}"
        )
    return _check_texts(_str_column(ds[spec.column], f"{name} column {spec.column!r}"), f"dataset {name!r}")


# --------------------------------------------------------------------------- tokenization
def _tokenize(texts: list[str], tokenizer: Any) -> torch.Tensor:
    if tokenizer is None:
        raise CalibrationDataError(
            "calibration text was given but tokenizer is None; pass the model's tokenizer, or give token ids "
            "(a 2-D integer tensor or a list of lists of int) instead of text"
        )
    if not callable(tokenizer):
        raise CalibrationDataError(
            f"tokenizer must be a transformers tokenizer (callable), got a {type(tokenizer).__name__}"
        )
    text = TEXT_SEPARATOR.join(texts)
    encoded = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = encoded["input_ids"]
    stream = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if stream.numel() == 0:
        raise CalibrationDataError(
            f"the calibration text ({len(text)} characters) produced no tokens; give non-empty text"
        )
    return stream
