"""Resuming an interrupted streaming run: the fingerprint of everything the output depends on, and the
progress record in the partial folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..config import OsscarConfig, describe_dataset
from ..errors import ResumeError
from ..io.save import CONFIG_NAME
from ..version import __version__
from .sources import INDEX_NAME, CheckpointError, HubFiles, LocalFiles, ShardReader

logger = logging.getLogger(__name__)

PROGRESS_NAME = "osscar_progress.json"


def partial_folder(target: Path) -> Path:
    """Where :func:`prune_checkpoint` builds the checkpoint for ``target`` (kept when a run is interrupted)."""
    return target.parent / f".{target.name}.osscar-partial"


def run_fingerprint(files: LocalFiles | HubFiles, reader: ShardReader, config: OsscarConfig,
                    windows: torch.Tensor | None, device: torch.device) -> dict[str, Any]:
    """Everything the output of pruning ``files`` with ``config`` depends on: a partial run resumes only when all
    of it is unchanged (see :func:`finished_blocks`).

    The source: a local folder's real path and its files' sizes and mtimes, or a Hub repository's id, the commit
    its revision resolved to and its files' sizes and blob ids (LFS sha256). The settings leave out the config
    fields named in ``OsscarConfig.RESULT_NEUTRAL_FIELDS`` (where activations are kept, say): they do not change
    the result, so changing them does not block a resume.
    """
    import transformers

    names = {CONFIG_NAME, *reader.weight_map.values()} | ({INDEX_NAME} if files.has(INDEX_NAME) else set())
    cfg = config
    neutral = set(getattr(type(cfg), "RESULT_NEUTRAL_FIELDS", ()))
    settings = {k: v for k, v in cfg.to_dict().items() if k not in neutral}
    return json.loads(json.dumps({
        **files.fingerprint(names),
        "config": settings | {"dataset": describe_dataset(cfg.dataset, cfg.text_column)},
        "calibration": None if windows is None else {
            "shape": list(windows.shape), "sha256": hashlib.sha256(windows.contiguous().cpu().numpy().tobytes()).hexdigest()},
        # Another GPU model may round differently, so the output would not be the uninterrupted run's.
        "device": f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device),
        "dtype": None if reader.dtype is None else str(reader.dtype).removeprefix("torch."),  # None: as stored
        "versions": {"osscar_hf": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }, default=str))


def _read_progress(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / PROGRESS_NAME).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) and data.get("version") == 1 else None
    except (OSError, ValueError):
        return None


class PartialRun(NamedTuple):
    """What an interrupted run recorded: its finished blocks, the sizes it planned (of a measured plan) and what its
    allocation search did (when it ran)."""

    done: list[dict[str, Any]]
    plan: list[dict[str, int]] | None = None
    search: dict[str, Any] | None = None


def write_progress(folder: Path, fingerprint: dict[str, Any], partial: PartialRun) -> None:
    """Record in ``folder`` the run's fingerprint (:func:`run_fingerprint`) and ``partial``, atomically (a crash
    leaves the previous record or this one)."""
    path = folder / PROGRESS_NAME
    tmp = folder / f".{PROGRESS_NAME}.tmp"
    record: dict[str, Any] = {"version": 1, "fingerprint": fingerprint, "blocks": partial.done}
    if partial.plan is not None:
        record["plan"] = partial.plan
    if partial.search is not None:
        record["search"] = partial.search
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def finished_blocks(folder: Path, fingerprint: dict[str, Any], resume: bool) -> PartialRun:
    """What an interrupted run in ``folder`` recorded (:func:`write_progress`), when it can be continued; nothing
    finished to start afresh (the folder is removed). Raises :class:`ResumeError` when ``resume`` is set and the run
    had another ``fingerprint``."""
    if not folder.exists():
        return PartialRun([])
    progress = _read_progress(folder)
    if not resume or progress is None:
        if progress is not None:
            logger.warning("discarding the partial run in %s (resume=False)", folder)
        shutil.rmtree(folder)
        return PartialRun([])
    if progress["fingerprint"] != fingerprint:
        changes = _differences(progress["fingerprint"], fingerprint)
        old, new = progress["fingerprint"].get("source"), fingerprint.get("source")
        hint = ""
        if isinstance(old, dict) and isinstance(new, dict) and old.get("hub") == new.get("hub") and \
                old.get("commit") != new.get("commit"):
            hint = (f"; {new.get('hub')} has moved from commit {old.get('commit')} to {new.get('commit')} since the "
                    f"interrupted run: pass revision={old.get('commit')!r} to finish it from the commit it started with")
        raise ResumeError(
            f"{folder} holds an interrupted run with other settings or another source ({'; '.join(changes[:6])}); "
            "run again with the same settings to continue it, or pass resume=False (osscar-hf prune --stream "
            "--no-resume) to discard it and start over"
            f"{hint}"
        )
    done: list[dict[str, Any]] = []
    for entry in progress["blocks"]:
        try:
            shapes = ShardReader.tensor_shapes(folder / entry["shard"])
        except CheckpointError as exc:
            logger.warning("block %d of the partial run must be pruned again: %s", len(done), exc)
            break
        if sorted(shapes) != sorted(entry["tensors"]):
            break
        done.append(entry)
    logger.info("resuming the interrupted run in %s after %d finished blocks", folder, len(done))
    return PartialRun(done, progress.get("plan"), progress.get("search"))
