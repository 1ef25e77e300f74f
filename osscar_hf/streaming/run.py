"""The streaming prune: the one orchestration of :mod:`osscar_hf.pipeline` with blocks read from the shards
(:class:`ShardBlocks`), a skeleton on meta, and the output written shard by shard (see :mod:`osscar_hf.streaming`)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from ..arch import ArchSpec, get_spec, get_submodule
from ..arch.experts import checkpoint_tensors, model_tensors
from ..budgets import BlockSize
from ..config import OsscarConfig
from ..distributed import Ranks, broadcast, guard, process_ranks, step
from ..errors import OsscarError, UnsupportedModelError
from ..evaluation import count_parameters
from ..host_memory import heap_fragmentation_hint, mapped_large_allocations, release_freed_memory
from ..io.load import resolve_dtype
from ..io.model_config import update_model_config
from ..io.save import (
    CONFIG_NAME,
    FORMATS,
    OutputConflictError,
    SaveError,
    attach_run,
    check_output_folder,
    fsync_tree,
    move_into_place,
    output_path,
    resolve_format,
    rewrite_config,
    write_model_card,
)
from ..io.shapes import apply_block_shapes, osscar_quantization_config
from ..pipeline import (
    activation_space,
    BlockStream,
    PruneRun,
    capture,
    finish_run,
    plan_sizes,
    prune_blocks,
    start_run,
)
from ..report import BlockReport, PruneReport
from ..surgery import add_part_biases, resize_block
from .lock import run_lock
from .resume import PROGRESS_NAME, PartialRun, finished_blocks, partial_folder, run_fingerprint, write_progress
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

logger = logging.getLogger(__name__)


class CheckpointPruner(Protocol):
    """What :func:`prune_checkpoint` needs of its pruner (an :class:`osscar_hf.OsscarPruner`): the settings, the
    calibration windows, and a place for the report. A protocol, so that streaming does not import the pruner
    that calls it."""

    config: OsscarConfig
    report: PruneReport | None

    def calibration_window_sets(self, model: nn.Module, tokenizer: Any = None, *, held_out: int = 0
                                ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

REPORT_NAME = "osscar_report.json"
SCRATCH_FOLDER = "planning"  # inside the partial folder: the planning pass's pruned copies of the blocks
# inside the partial folder: the Grams the planning kept for the pruning pass, until each block is written (kept
# for a resume)
STATISTICS_FOLDER = "planning-grams"


def _load(module: nn.Module, tensors: dict[str, torch.Tensor], what: str, files: list[str], strict: bool) -> None:
    try:
        module.load_state_dict(tensors, strict=strict, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights of {what} in {', '.join(files)} do not fit the model built from "
                              f"config.json: {exc}") from None


def _materialise(block: nn.Module, reader: ShardReader, keys: list[str], block_prefix: str,
                 spec: ArchSpec) -> None:
    tensors = model_tensors(spec, reader.read(keys))  # a mixture of experts' tensors stacked per parameter
    _load(block, {k[len(block_prefix):]: v for k, v in tensors.items()}, block_prefix.rstrip("."),
          reader.files(keys), strict=True)


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


def _check_format(run: PruneRun, checkpoint_format: str) -> None:
    """Refuse, before any work, a ``checkpoint_format`` the pruned checkpoint could not be saved in.

    When the config fixes every block's sizes, the pruned shapes are known now: a meta copy of the skeleton resized
    to them (costs nothing) goes through the same config update and format check as the finished model will. A
    global allocation chooses per-block sizes, which the stock format cannot hold.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if checkpoint_format not in FORMATS:
        raise SaveError(f"format must be one of {list(FORMATS)}, got {checkpoint_format!r}")
    if checkpoint_format == "auto":
        return
    settings = run.settings
    if not settings.sizes:
        if checkpoint_format == "stock":
            raise SaveError("format='stock' cannot hold the per-block sizes a global allocation chooses; use "
                            "format='auto', 'osscar' or 'remote_code'")
        return
    with init_empty_weights():
        probe = AutoModelForCausalLM.from_config(copy.deepcopy(run.model.config))
    shapes = [{**settings.attention_layout.shape(s.attention), "ffn_dim": s.mlp} for s in settings.sizes]
    apply_block_shapes(probe, shapes, run.spec)
    if settings.method.adds_bias:
        for block in get_submodule(probe, run.spec.blocks):
            add_part_biases(block, run.spec)
    update_model_config(probe, run.spec, n_rep=settings.n_rep, head_dim=settings.head_dim, osscar_config=run.config)
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


# --------------------------------------------------------------------------- the blocks, from shards to shards
@dataclass
class ShardBlocks:
    """The :class:`~osscar_hf.pipeline.BlockSource` of a streamed run: each block is read from the source shards
    just before it is used and released (moved to meta) after; a pruned block is written to its own output shard in
    the partial folder ``tmp`` and recorded in the progress file. Of a distributed run, only rank 0 writes
    (``writes``); every rank keeps its own planning copies (:attr:`scratch_folder`)."""

    reader: ShardReader
    files: LocalFiles | HubFiles
    block_keys: list[list[str]]
    prefix: str
    tmp: Path
    fingerprint: dict[str, Any]
    num_shards: int
    last_uses: dict[int, list[str]]
    spec: ArchSpec
    done: list[dict[str, Any]] = field(default_factory=list)
    plan: list[dict[str, int]] | None = None
    search: dict[str, Any] | None = None  # the allocation search's summary, kept for a resumed run's report
    weight_map: dict[str, str] = field(default_factory=dict)
    total_size: int = 0
    scratch_modules: dict[int, nn.Module] = field(default_factory=dict)
    rank: int | None = None  # of a distributed run; None: a single process

    @property
    def writes(self) -> bool:
        return not self.rank

    def _rank_folder(self, name: str) -> Path:
        """A folder of this process's own in the partial folder (one per rank in a distributed run)."""
        return self.tmp / (name if self.rank is None else f"{name}-rank{self.rank}")

    @property
    def scratch_folder(self) -> Path:
        return self._rank_folder(SCRATCH_FOLDER)

    @property
    def statistics_folder(self) -> Path:
        return self._rank_folder(STATISTICS_FOLDER)

    def _statistics_file(self, index: int) -> Path:
        return self.statistics_folder / f"block-{index:05d}.safetensors"

    def keep_statistics(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self.statistics_folder.mkdir(parents=True, exist_ok=True)
        _save_shard(tensors, self._statistics_file(index))

    def statistics(self, index: int) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self._statistics_file(index)
        return load_file(path) if path.is_file() else None

    def has_statistics(self, index: int) -> bool:
        return self._statistics_file(index).is_file()

    def load(self, index: int, block: nn.Module) -> None:
        _materialise(block, self.reader, self.block_keys[index], f"{self.prefix}{index}.", self.spec)

    def release(self, index: int, block: nn.Module) -> None:
        block.to("meta")
        release_freed_memory()

    def store(self, index: int, block: nn.Module, report: BlockReport) -> None:
        if not self.writes:
            self._statistics_file(index).unlink(missing_ok=True)
            self.release(index, block)
            return
        block_prefix = f"{self.prefix}{index}."
        name = _shard_name(index + 2, self.num_shards)
        # The checkpoint's names: a mixture of experts' tensors split per expert, the family's prefixes renamed.
        state = {block_prefix + k: v for k, v in block.state_dict().items()}
        out = {self.spec.stored_name(k): v for k, v in checkpoint_tensors(self.spec, state).items()}
        size = _save_shard(out, self.tmp / name)
        self._add(out, name, size)
        self.done.append({"report": asdict(report), "shard": name, "tensors": sorted(out), "bytes": size})
        self.save_progress()
        self._statistics_file(index).unlink(missing_ok=True)  # after the progress: a resume needs it until then
        del out
        self.release(index, block)
        self.finished_phase(index)

    def _add(self, tensors: Any, shard: str, size: int) -> None:
        self.weight_map.update(dict.fromkeys(tensors, shard))
        self.total_size += size

    def save_progress(self) -> None:
        if self.writes:
            write_progress(self.tmp, self.fingerprint, PartialRun(self.done, self.plan, self.search))

    def finished_phase(self, phase: int) -> None:
        """Source files needed for the last time by ``phase`` (-1: the non-block weights) may go."""
        for shard in self.last_uses.get(phase, []):
            self.files.done_with(shard)

    def keep_scratch(self, index: int, module: nn.Module) -> None:
        """A planning copy of block ``index`` goes to its own file in the partial folder; its structure stays, on
        meta."""
        folder = self.scratch_folder
        folder.mkdir(parents=True, exist_ok=True)
        _save_shard(dict(module.state_dict()), folder / f"block-{index:05d}.safetensors")
        module.to("meta")
        self.scratch_modules[index] = module
        release_freed_memory()

    def scratch(self, index: int) -> nn.Module:
        from safetensors.torch import load_file

        module = self.scratch_modules[index]
        module.load_state_dict(load_file(self.scratch_folder / f"block-{index:05d}.safetensors"), assign=True)
        return module

    def release_scratch(self, index: int, module: nn.Module) -> None:
        module.to("meta")
        release_freed_memory()

    def drop_scratch(self, index: int, module: nn.Module) -> None:
        module.to("meta")
        self.scratch_modules.pop(index, None)
        (self.scratch_folder / f"block-{index:05d}.safetensors").unlink(missing_ok=True)
        release_freed_memory()

    def replay(self, run: PruneRun, index: int, block: nn.Module, stream: BlockStream | None) -> None:
        """Block ``index`` was finished by an interrupted run: give it its pruned shape, and move ``stream`` (None
        when no block's inputs are needed any more) past it by one forward of the dense block from the source
        and/or the pruned one from its shard, exactly as the loop computed them; nothing is solved again."""
        settings, entry = run.settings, self.done[index]
        report = BlockReport.from_dict(entry["report"])
        if stream is not None and (not settings.propagate or settings.dense_targets):
            self.load(index, block)
            stream.replay(index, block, pruned=False)
            block.to("meta")
        shape = {**settings.attention_layout.shape_of_solver_kept(report.attention.kept),
                 "ffn_dim": report.mlp.kept_per_expert}
        if report.shared_expert is not None:
            shape["shared_ffn_dim"] = report.shared_expert.kept
        with torch.device("cpu"):
            resize_block(block, run.spec, shape, n_rep=settings.n_rep, head_dim=settings.head_dim)
            if settings.method.adds_bias:
                add_part_biases(block, run.spec)
        if stream is not None:  # (else only the block's new shape is needed, for config.json)
            if settings.propagate:
                pruned = ShardReader(self.tmp, {k: entry["shard"] for k in entry["tensors"]})
                names = entry["tensors"]
                if self.spec.checkpoint_renames:  # the shard holds the checkpoint's names
                    pruned.rename(self.spec.model_name)
                    names = [self.spec.model_name(k) for k in names]
                _materialise(block, pruned, names, f"{self.prefix}{index}.", self.spec)
                stream.replay(index, block, pruned=True)
                block.to("meta")
            stream.finish_replay()
        release_freed_memory()
        self._add(entry["tensors"], entry["shard"], entry["bytes"])
        self.finished_phase(index)


# --------------------------------------------------------------------------- the entry point
def prune_checkpoint(
    pruner: CheckpointPruner,
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

    See :meth:`osscar_hf.OsscarPruner.prune_checkpoint`. Of a distributed run every rank reads the shards, rank 0
    alone takes the lock and writes (see ``docs/distributed.md``).
    """
    started = time.perf_counter()
    cast = _weights_dtype(dtype)
    with mapped_large_allocations() if map_large_allocations else contextlib.nullcontext(False) as mapped, \
            process_ranks(pruner.config.resolved_device()) as ranks, guard(ranks):
        progress = progress and ranks.is_main
        hint = None if mapped else heap_fragmentation_hint()
        if hint is not None:
            logger.info(hint)
        files = open_source(model_path, revision=revision, token=token, cache_dir=cache_dir, endpoint=endpoint,
                            delete_downloaded_shards=delete_downloaded_shards and ranks.is_main, progress=progress)
        target = output_path(output_dir)
        folder = files.folder if isinstance(files, LocalFiles) else None
        if ranks.is_main:
            _check_target(folder, target, overwrite)
        with run_lock(target, str(folder) if folder is not None else files.repo_id) if ranks.is_main \
                else contextlib.nullcontext():
            if ranks.is_main:  # again: a run that held the lock may have just written it
                _check_target(folder, target, overwrite)
            return _prune_locked(pruner, files, target, tokenizer=tokenizer, progress=progress, resume=resume,
                                 checkpoint_format=format, overwrite=overwrite, dtype=cast, base_model=base_model,
                                 started=started, ranks=ranks)


def _open_config(files: LocalFiles | HubFiles, base_model: str | None) -> Any:
    from transformers import AutoConfig

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
    return config


def _source_tokenizer(files: LocalFiles | HubFiles) -> Any:
    if not any(files.has(name) for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(files.config_folder())
    except Exception as exc:  # noqa: BLE001 - token-id calibration data needs no tokenizer
        logger.warning("could not load the tokenizer of %s (%s); calibrating without one", files.describe(), exc)
        return None


def _split_keys(model: nn.Module, spec: ArchSpec, reader: ShardReader, files: LocalFiles | HubFiles
                ) -> tuple[list[list[str]], list[str]]:
    """The checkpoint's tensor names per block and outside the blocks, checked against the skeleton's shapes."""
    blocks = get_submodule(model, spec.blocks)
    prefix = f"{spec.blocks}."
    expected = checkpoint_tensors(spec, model.state_dict())  # per-expert tensors as the checkpoint stores them
    block_keys: list[list[str]] = [[] for _ in blocks]
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
            block_keys[int(key[len(prefix):].split(".", 1)[0])].append(key)
        else:
            other_keys.append(key)
    for i, keys in enumerate(block_keys):
        names = set(checkpoint_tensors(spec, {f"{prefix}{i}.{n}": v for n, v in blocks[i].state_dict().items()}))
        if names - set(keys):
            raise CheckpointError(
                f"the checkpoint in {files.describe()} has no weights for {sorted(names - set(keys))[:5]} (block {i})")
    return block_keys, other_keys


def _write_non_block_weights(model: nn.Module, spec: ArchSpec, other_keys: list[str], source: ShardBlocks) -> None:
    """The non-block weights to the first output shard, as in the source (a tied head is not written twice), under
    the names the family's checkpoints use (:meth:`ArchSpec.stored_name`)."""
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
        others[spec.stored_name(key)] = tensor
    name = _shard_name(1, source.num_shards)
    source._add(others, name, _save_shard(others, source.tmp / name))


def _prune_locked(pruner: CheckpointPruner, files: LocalFiles | HubFiles, target: Path, *, tokenizer: Any,
                  progress: bool, resume: bool, checkpoint_format: str, overwrite: bool,
                  dtype: torch.dtype | None, base_model: str | None, started: float, ranks: Ranks) -> Path:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = _open_config(files, base_model)
    spec = get_spec(config)
    reader = ShardReader(files, dtype=dtype)
    if spec.checkpoint_renames:
        reader.rename(spec.model_name)
    user_tokenizer = tokenizer
    tokenizer = tokenizer if tokenizer is not None else _source_tokenizer(files)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    spec.check_model(model)
    block_keys, other_keys = _split_keys(model, spec, reader, files)
    run = start_run(pruner.config, model, spec,
                    lambda held_out: pruner.calibration_window_sets(model, tokenizer, held_out=held_out), ranks)
    run.started = started
    _check_format(run, checkpoint_format)
    # Non-block weights: load, tie, check that nothing outside the blocks is still on meta.
    prefix = f"{spec.blocks}."
    _load(model, reader.read(other_keys), "the embeddings and head", reader.files(other_keys), strict=False)
    model.tie_weights()
    missing = sorted(n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(prefix))
    if missing:
        raise CheckpointError(f"the checkpoint in {files.describe()} has no weights for {missing[:5]}")
    run.params_before = count_parameters(model)  # now that a tied head is tied: counted once

    fingerprint = run_fingerprint(files, reader, pruner.config, run.windows, run.settings.device)
    tmp = partial_folder(target)
    partial = _open_partial(files, tmp, fingerprint, resume, ranks)
    source = ShardBlocks(reader=reader, files=files, block_keys=block_keys, prefix=prefix, tmp=tmp,
                         fingerprint=fingerprint, num_shards=len(block_keys) + 1,
                         last_uses=_last_uses(reader, other_keys, block_keys), spec=spec, done=partial.done,
                         plan=partial.plan, search=partial.search, rank=ranks.rank if ranks.distributed else None)
    if partial.plan is not None and not run.settings.sizes:
        run.settings = run.settings.with_sizes([BlockSize(**entry) for entry in partial.plan])
        run.search_summary = partial.search
    try:
        reports, activations = _stream_blocks(run, source, other_keys, progress)
        if not source.writes:
            pruner.report = finish_run(run, reports, activations=activations)
            return target
        _write_checkpoint(pruner, run, source, reports, activations, target, overwrite=overwrite,
                          checkpoint_format=checkpoint_format, user_tokenizer=user_tokenizer)
    except BaseException:
        if not source.writes:
            raise
        if any(tmp.glob("model-*.safetensors")) and (tmp / PROGRESS_NAME).is_file():
            logger.error("pruning stopped after %d of %d blocks; the finished blocks are kept in %s: run "
                         "prune_checkpoint again with the same settings to continue", len(source.done),
                         len(block_keys), tmp)
        elif files.pending_deletions():
            logger.error("pruning stopped before the first block was finished; %s keeps the list of the files this "
                         "run downloaded, to delete them when a rerun is done with them", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote the pruned checkpoint to %s", target)
    return target


def _open_partial(files: LocalFiles | HubFiles, tmp: Path, fingerprint: dict[str, Any], resume: bool, ranks: Ranks
                  ) -> PartialRun:
    """The partial folder ``tmp``, made or continued by rank 0 (which alone writes there): what an interrupted run
    recorded, the same on every rank."""
    partial = PartialRun([])
    with step(ranks):
        if ranks.is_main:
            earlier_downloads = files.read_record(tmp) if resume else []
            partial = finished_blocks(tmp, fingerprint, resume)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir(exist_ok=True)
            files.keep_record(tmp, earlier_downloads)
    return broadcast(partial, ranks)


def _stream_blocks(run: PruneRun, source: ShardBlocks, other_keys: list[str], progress: bool
                   ) -> tuple[list[BlockReport], dict[str, Any]]:
    """Capture, plan, prune (or replay) every block; return the block reports and where the activations were kept.
    The activations live in a space (memory, or files in a temporary folder) removed at the end, also on errors."""
    space = activation_space(run)
    # Every block finished (the run stopped while writing the checkpoint): no block's inputs are needed any more.
    finished = len(source.done) == len(source.block_keys)
    with space:
        captured = None
        if not finished:
            with torch.no_grad():
                captured = capture(run, space)
        if source.writes:
            _write_non_block_weights(run.model, run.spec, other_keys, source)
        if captured is not None:
            # A measured plan runs the LM head (the non-block weights stay until it is made).
            measured = not run.settings.sizes
            try:
                with torch.no_grad():
                    plan_sizes(run, source, captured, progress=progress)
            finally:  # the planning copies are not kept for a resume (it measures again)
                shutil.rmtree(source.scratch_folder, ignore_errors=True)
            if measured:  # a resumed run reuses this plan instead of measuring again
                source.plan = [size.to_dict() for size in run.settings.sizes]
                source.search = run.search_summary
                source.save_progress()
        _to_meta_outside(run.model, source.prefix)
        release_freed_memory()
        source.finished_phase(-1)
        if captured is None:  # only the finished blocks' shapes are needed, for config.json
            for index, block in enumerate(run.blocks):
                source.replay(run, index, block, None)
            return [BlockReport.from_dict(entry["report"]) for entry in source.done], space.summary()
        with torch.no_grad():
            reports = prune_blocks(run, source, captured, progress=progress,
                                   finished=[BlockReport.from_dict(entry["report"]) for entry in source.done],
                                   replay=lambda i, block, stream: source.replay(run, i, block, stream),
                                   description="OSSCAR pruning (streaming)")
        shutil.rmtree(source.statistics_folder, ignore_errors=True)
    return reports, space.summary()


def _write_checkpoint(pruner: CheckpointPruner, run: PruneRun, source: ShardBlocks, reports: list[BlockReport],
                      activations: dict[str, Any], target: Path, *, overwrite: bool, checkpoint_format: str,
                      user_tokenizer: Any) -> None:
    """Index, config, tokenizer and generation files, report and card into the partial folder, then move it into
    place."""
    tmp, files, model = source.tmp, source.files, run.model
    index = {"metadata": {"total_size": source.total_size}, "weight_map": dict(sorted(source.weight_map.items()))}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    pruner.report = report = finish_run(run, reports, activations=activations)
    model.config.architectures = [type(model).__name__]
    if source.reader.dtype is not None:
        model.config.dtype = source.reader.dtype
    model.config.save_pretrained(tmp)
    fmt = resolve_format(model, checkpoint_format)
    rewrite_config(tmp, model, fmt)
    for name in (GENERATION_CONFIG_NAME, *TOKENIZER_FILES):
        if files.has(name):
            shutil.copy2(files.path(name), tmp / name)
    if user_tokenizer is not None:
        user_tokenizer.save_pretrained(tmp)
    report.to_json(tmp / REPORT_NAME)
    if any(b.attention.solved or b.mlp.solved for b in reports):
        attach_run(model, report, pruner.config)
        write_model_card(model, tmp, fmt)
    fsync_tree(tmp)
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
