"""The streaming prune itself: skeleton on meta, non-block weights, then each block read, pruned, written
and released (see :mod:`osscar_hf.streaming`)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..arch import get_spec, get_submodule
from ..errors import OsscarError, UnsupportedModelError
from ..host_memory import heap_fragmentation_hint, mapped_large_allocations, release_freed_memory
from ..io.save import (
    CONFIG_NAME,
    FORMATS,
    OutputConflictError,
    SaveError,
    _fsync_tree,
    _rewrite_config,
    check_output_folder,
    move_into_place,
    output_path,
    resolve_format,
)
from ..io.shapes import osscar_quantization_config
from ..surgery import resize_block
from .lock import run_lock
from .resume import (
    PROGRESS_NAME,
    _block_report,
    _fingerprint,
    _finished_blocks,
    _write_progress,
    partial_folder,
)
from .sources import (
    GENERATION_CONFIG_NAME,
    INDEX_NAME,
    TOKENIZER_FILES,
    CheckpointError,
    HubFiles,
    LocalFiles,
    ShardReader,
    open_source,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..pruner import OsscarPruner

logger = logging.getLogger(__name__)

REPORT_NAME = "osscar_report.json"


def _materialise(block: nn.Module, reader: ShardReader, keys: list[str], block_prefix: str) -> None:
    tensors = reader.read(keys)
    _load(block, {k[len(block_prefix):]: v for k, v in tensors.items()}, block_prefix.rstrip("."),
          reader.files(keys), strict=True)


def _load(module: nn.Module, tensors: dict[str, torch.Tensor], what: str, files: list[str], strict: bool) -> None:
    try:
        module.load_state_dict(tensors, strict=strict, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights of {what} in {', '.join(files)} do not fit the model built from "
                              f"config.json: {exc}") from None


def _to_meta_outside(model: nn.Module, prefix: str) -> None:
    """Move every parameter whose name does not start with ``prefix`` to meta (tied ones stay tied)."""
    moved: dict[int, nn.Parameter] = {}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if name.startswith(prefix) or param.device.type == "meta":
            continue
        owner, _, attr = name.rpartition(".")
        module = get_submodule(model, owner)
        if id(param) not in moved:
            moved[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        module._parameters[attr] = moved[id(param)]


def _weights_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``dtype=`` of prune_checkpoint: None (or "auto") keeps the checkpoint's; else a floating-point dtype."""
    from ..metrics import resolve_dtype

    resolved = resolve_dtype(dtype)
    if resolved == "auto":
        return None
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16, float16 or 'auto' (the checkpoint's), got {dtype!r}")
    return resolved


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_target(source: Path | None, target: Path, overwrite: bool) -> None:
    if source is not None:
        if _same_folder(source, target):
            raise SaveError(f"refusing to write the pruned checkpoint into {str(target)!r}: it is the dense "
                            "checkpoint's own folder. Choose another output folder.")
        if os.path.realpath(source).startswith(os.path.realpath(target) + os.sep):
            raise SaveError(f"refusing to write the pruned checkpoint into {str(target)!r}: the dense checkpoint "
                            f"{str(source)!r} is inside it")
    check_output_folder(target, overwrite)


def _write_card(model: nn.Module, pruner: OsscarPruner, folder: Path, checkpoint_format: str) -> None:
    """The osscar model card (README.md), as a model pruned in memory and saved would have it."""
    from ..io.save import attach_run, write_model_card

    attach_run(model, pruner.report, pruner.config)
    write_model_card(model, folder, checkpoint_format)


def _check_format(model: nn.Module, spec: Any, settings: Any, pruner: OsscarPruner, checkpoint_format: str) -> None:
    """Refuse, before any work, a ``checkpoint_format`` the pruned checkpoint could not be saved in.

    Every block keeps the same counts, so the pruned shapes are known now: a meta copy of the skeleton resized to
    them (costs nothing) goes through the same config update and format check as the finished model will.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..io.shapes import apply_block_shapes
    from ..pruner import update_model_config

    if checkpoint_format not in FORMATS:
        raise SaveError(f"format must be one of {list(FORMATS)}, got {checkpoint_format!r}")
    if checkpoint_format == "auto":
        return
    with init_empty_weights():
        probe = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    kept = settings.attention.num_keep
    shape = {"num_key_value_heads": kept, "num_attention_heads": kept * settings.n_rep,
             "ffn_dim": settings.mlp.num_keep}
    apply_block_shapes(probe, [dict(shape) for _ in get_submodule(probe, spec.blocks)], spec)
    update_model_config(probe, spec, n_rep=settings.n_rep, head_dim=settings.head_dim, osscar_config=pruner.config)
    resolve_format(probe, checkpoint_format)


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> int:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


# --------------------------------------------------------------------------- the streaming prune
def _last_uses(reader: ShardReader, other_keys: list[str], block_keys: list[list[str]]) -> dict[int, list[str]]:
    """Which source files the run needs for the last time in each phase (-1: the non-block weights, i: block i)."""
    last: dict[str, int] = {shard: -1 for shard in reader.shards(other_keys)}
    for i, keys in enumerate(block_keys):
        for shard in reader.shards(keys):
            last[shard] = i
    out: dict[int, list[str]] = {}
    for shard, phase in sorted(last.items()):
        out.setdefault(phase, []).append(shard)
    return out


def prune_checkpoint(
    pruner: OsscarPruner,
    model_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = True,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
    delete_downloaded_shards: bool = False,
    format: str = "auto",
    map_large_allocations: bool = True,
    dtype: str | torch.dtype | None = None,
    base_model: str | None = None,
) -> Path:
    """Prune the safetensors checkpoint ``model_path`` (a local folder or a Hub model id) block by block into
    ``output_dir`` in the checkpoint ``format`` of :func:`osscar_hf.save_pruned`; return its path.

    See :meth:`osscar_hf.OsscarPruner.prune_checkpoint`.
    """
    start = time.perf_counter()
    cast = _weights_dtype(dtype)
    with mapped_large_allocations() if map_large_allocations else contextlib.nullcontext(False) as mapped:
        hint = None if mapped else heap_fragmentation_hint()
        if hint is not None:
            logger.info(hint)
        files = open_source(model_path, revision=revision, token=token, cache_dir=cache_dir, endpoint=endpoint,
                            delete_downloaded_shards=delete_downloaded_shards, progress=progress)
        target = output_path(output_dir)
        folder = files.folder if isinstance(files, LocalFiles) else None
        _check_target(folder, target, overwrite)
        with run_lock(target, str(folder) if folder is not None else files.repo_id):
            _check_target(folder, target, overwrite)  # again: a run that held the lock may have just written it
            return _prune_locked(pruner, files, target, tokenizer=tokenizer, progress=progress, resume=resume,
                                 start=start, checkpoint_format=format, overwrite=overwrite, dtype=cast,
                                 base_model=base_model)


def _prune_locked(pruner: OsscarPruner, files: LocalFiles | HubFiles, target: Path, *, tokenizer: Any,
                  progress: bool, resume: bool, start: float, checkpoint_format: str, overwrite: bool,
                  dtype: torch.dtype | None, base_model: str | None) -> Path:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..activations import ActivationSpace
    from ..capture import capture_block_inputs
    from ..evaluation import count_parameters
    from ..pipeline import BlockStream, announce_block
    from ..pruner import update_model_config

    files.connect()
    if not files.has(CONFIG_NAME):
        raise CheckpointError(f"{files.describe()} has no {CONFIG_NAME}")
    config = AutoConfig.from_pretrained(files.config_folder())
    if base_model is not None or isinstance(files, HubFiles):
        config._name_or_path = base_model or files.repo_id  # the card's base_model
    try:
        if osscar_quantization_config(config) is not None:
            raise UnsupportedModelError(
                "this checkpoint was already pruned by osscar_hf; prune the dense checkpoint instead")
    except OsscarError as exc:
        if isinstance(exc, UnsupportedModelError):
            raise
        raise UnsupportedModelError(f"{exc}; osscar_hf prunes full-precision models") from None
    spec = get_spec(config)
    reader = ShardReader(files, dtype=dtype)
    user_tokenizer = tokenizer
    if tokenizer is None and any(files.has(name) for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(files.config_folder())
        except Exception as exc:  # noqa: BLE001 - token-id calibration data needs no tokenizer
            logger.warning("could not load the tokenizer of %s (%s); calibrating without one", files.describe(), exc)

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    blocks = get_submodule(model, spec.blocks)
    num_blocks = len(blocks)
    prefix = f"{spec.blocks}."
    expected = model.state_dict()
    block_keys: list[list[str]] = [[] for _ in range(num_blocks)]
    other_keys: list[str] = []
    for key in reader.weight_map:
        if key not in expected:
            logger.warning("ignoring %r of %s: the model has no such weight", key, reader.weight_map[key])
            continue
        if reader.shapes[key] != tuple(expected[key].shape):
            raise CheckpointError(
                f"{key!r} in {files.display(reader.weight_map[key])} has shape {list(reader.shapes[key])} but the "
                f"model built from {CONFIG_NAME} expects {list(expected[key].shape)}: do the weights and config.json "
                "belong together?"
            )
        if key.startswith(prefix):
            index = int(key[len(prefix):].split(".", 1)[0])
            block_keys[index].append(key)
        else:
            other_keys.append(key)
    for i, keys in enumerate(block_keys):
        names = {f"{prefix}{i}.{n}" for n in blocks[i].state_dict()}
        if names - set(keys):
            raise CheckpointError(
                f"the checkpoint in {files.describe()} has no weights for {sorted(names - set(keys))[:5]} (block {i})")
    last_uses = _last_uses(reader, other_keys, block_keys)

    settings = pruner._settings(model, spec)
    _check_format(model, spec, settings, pruner, checkpoint_format)
    # Non-block weights: load, tie, check that nothing outside the blocks is still on meta.
    _load(model, reader.read(other_keys), "the embeddings and head", reader.files(other_keys), strict=False)
    model.tie_weights()
    missing = sorted(n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(prefix))
    if missing:
        raise CheckpointError(f"the checkpoint in {files.describe()} has no weights for {missing[:5]}")

    windows = pruner.calibration_windows(model, tokenizer)
    params_before = count_parameters(model)
    logger.info(
        "OSSCAR (streaming %s): %s, %d blocks; keeping %d/%d attention groups and %d/%d neurons per block; "
        "%d windows of %d tokens", files.describe(), spec.name, num_blocks, settings.attention.num_keep,
        settings.num_attention_groups, settings.mlp.num_keep, settings.num_neurons, *windows.shape,
    )

    fingerprint = _fingerprint(files, reader, pruner, windows, settings.device)
    tmp = partial_folder(target)
    earlier_downloads = files.read_record(tmp) if resume else []
    done = _finished_blocks(tmp, fingerprint, resume)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(exist_ok=True)
    files.keep_record(tmp, earlier_downloads)

    def finished_phase(phase: int) -> None:
        for shard in last_uses.get(phase, []):
            files.done_with(shard)

    # Where the calibration activations live (memory, or files in a temporary folder removed at the end, also on
    # errors): block-0 inputs go there as they are captured.
    space = ActivationSpace.for_settings(settings)
    # Every block finished (the run stopped while writing the checkpoint): no block's inputs are needed any more.
    finished = len(done) == num_blocks
    try:
        with space:
            captured = None
            if not finished:
                with torch.no_grad():
                    captured = capture_block_inputs(model, blocks, windows, batch_size=pruner.config.batch_size,
                                                    storage_device=settings.storage_device, activations=space)
            weight_map: dict[str, str] = {}
            total_size = 0
            shards = num_blocks + 1
            # The non-block weights, as in the source (a tied head is not written twice), then back to meta.
            state = model.state_dict()
            seen: set[int] = set()
            others: dict[str, torch.Tensor] = {}
            # A tied head comes last, so the embedding is the copy kept (as save_pretrained keeps it).
            head = model.get_output_embeddings()
            head_keys = {f"{n}.weight" for n, m in model.named_modules() if m is head} if head is not None else set()
            for key in sorted(other_keys, key=lambda k: k in head_keys):
                tensor = state[key]
                ptr = tensor.untyped_storage().data_ptr()
                if ptr in seen:  # tied to a weight already written
                    continue
                seen.add(ptr)
                others[key] = tensor
            name = _shard_name(1, shards)
            total_size += _save_shard(others, tmp / name)
            weight_map.update(dict.fromkeys(others, name))
            del state, others
            _to_meta_outside(model, prefix)
            release_freed_memory()
            finished_phase(-1)

            stream = BlockStream(spec, captured, settings) if captured is not None else None  # closed below
            reports = []
            # Recomputing the outputs of the blocks an interrupted run finished has a bar of its own; the pruning bar
            # starts after it, at their count, so that its rate and ETA are those of the blocks still to prune.
            bar = tqdm(total=len(done), desc="OSSCAR resuming (outputs of finished blocks)", unit="block",
                       disable=not progress or not done)
            try:
                # Blocks an interrupted run finished: their next inputs are recomputed (one forward per block, the
                # dense block from the source and/or the pruned one from its shard), nothing is solved again.
                for i, entry in enumerate(done):
                    block, block_prefix = blocks[i], f"{prefix}{i}."
                    report = _block_report(entry["report"])
                    if stream is not None and (not settings.propagate or settings.dense_targets):
                        _materialise(block, reader, block_keys[i], block_prefix)
                        stream.replay(i, block, pruned=False)
                        block.to("meta")
                    shape = {"num_key_value_heads": report.attention.kept, "ffn_dim": report.mlp.kept,
                             "num_attention_heads": report.attention.kept * settings.n_rep}
                    with torch.device("cpu"):
                        resize_block(block, spec, shape, n_rep=settings.n_rep, head_dim=settings.head_dim)
                    if stream is not None:  # (else only the block's new shape is needed, for config.json)
                        if settings.propagate:
                            pruned = ShardReader(tmp, {k: entry["shard"] for k in entry["tensors"]})
                            _materialise(block, pruned, entry["tensors"], block_prefix)
                            stream.replay(i, block, pruned=True)
                            block.to("meta")
                        stream.finish_replay()
                    release_freed_memory()
                    weight_map.update(dict.fromkeys(entry["tensors"], entry["shard"]))
                    total_size += entry["bytes"]
                    reports.append(report)
                    finished_phase(i)
                    bar.update(1)
                bar.close()
                bar = tqdm(total=num_blocks, initial=len(done), desc="OSSCAR pruning (streaming)", unit="block",
                           disable=not progress)
                for i in range(len(done), num_blocks):
                    block, block_prefix = blocks[i], f"{prefix}{i}."
                    _materialise(block, reader, block_keys[i], block_prefix)
                    report = stream.prune(i, block)
                    name = _shard_name(i + 2, shards)
                    out = {block_prefix + k: v for k, v in block.state_dict().items()}
                    size = _save_shard(out, tmp / name)
                    weight_map.update(dict.fromkeys(out, name))
                    total_size += size
                    done.append({"report": asdict(report), "shard": name, "tensors": sorted(out), "bytes": size})
                    _write_progress(tmp, fingerprint, done)
                    del out
                    block.to("meta")
                    release_freed_memory()
                    reports.append(report)
                    finished_phase(i)
                    announce_block(bar, report)
            finally:
                bar.close()
                if stream is not None:
                    stream.close()  # its activation stores: files are deleted at once
            del captured

        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        solved = any(b.attention.solved or b.mlp.solved for b in reports)
        if solved:
            update_model_config(model, spec, n_rep=settings.n_rep, head_dim=settings.head_dim,
                                osscar_config=pruner.config)
        model.config.architectures = [type(model).__name__]
        if dtype is not None:
            model.config.dtype = dtype
        model.config.save_pretrained(tmp)
        fmt = resolve_format(model, checkpoint_format)
        _rewrite_config(tmp, model, fmt)
        for name in (GENERATION_CONFIG_NAME, *TOKENIZER_FILES):
            if files.has(name):
                shutil.copy2(files.path(name), tmp / name)
        if user_tokenizer is not None:
            user_tokenizer.save_pretrained(tmp)
        pruner.report = pruner._build_report(model, windows, params_before, count_parameters(model), start, reports,
                                             activations=space.summary())
        pruner.report.to_json(tmp / REPORT_NAME)
        if solved:
            _write_card(model, pruner, tmp, fmt)
        _fsync_tree(tmp)
        # The progress record goes only once the folder is in place: until then a failure (a full disk, a
        # folder that appeared at the target, Ctrl-C) leaves a partial run that a rerun finishes.
        try:
            move_into_place(tmp, target, overwrite=overwrite)
        except OutputConflictError as exc:
            raise OutputConflictError(
                f"{exc}; every block is finished and kept in {str(tmp)!r}: move {str(target)!r} away (or pass "
                "overwrite=True) and run again with the same settings to write the checkpoint without solving any "
                "block again") from None
        (target / PROGRESS_NAME).unlink()
        (target / HubFiles.RECORD_NAME).unlink(missing_ok=True)
    except BaseException:
        if any(tmp.glob("model-*.safetensors")) and (tmp / PROGRESS_NAME).is_file():
            logger.error("pruning stopped after %d of %d blocks; the finished blocks are kept in %s: run "
                         "prune_checkpoint again with the same settings to continue", len(done), num_blocks, tmp)
        elif files.pending_deletions():
            logger.error("pruning stopped before the first block was finished; %s keeps the list of the files this "
                         "run downloaded, to delete them when a rerun is done with them", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote the pruned checkpoint to %s", target)
    return target
