"""Prune a safetensors checkpoint larger than memory, block by block (``OsscarPruner.prune_checkpoint``).

The whole model is never loaded. The skeleton is built on the meta device (``accelerate.init_empty_weights``:
parameters on meta, buffers such as rotary ``inv_freq`` real) from the folder's ``config.json``; the weights
outside the decoder blocks (embeddings, positions, final norm, LM head) are loaded to capture every block's
calibration inputs, written to the first output shard and dropped again. Then, for each block in turn, its
tensors are read from the shards (``safe_open(...).get_tensor`` through the index's ``weight_map``), the block
is materialised (``load_state_dict(..., assign=True)``), pruned by the same code as the in-memory loop
(:class:`osscar_hf.pipeline.BlockStream`), written to its own output shard and moved back to meta. Peak host
memory is about the calibration activations plus one block (plus the non-block weights during the capture).

The output folder is a complete checkpoint (shards, ``model.safetensors.index.json``, ``config.json`` in the
stock format when it expresses the pruned shapes and in the osscar format otherwise, tokenizer files,
``generation_config.json``, ``osscar_report.json``, a ``README.md`` model card), built in a hidden folder beside
the target (``.NAME.osscar-partial``) and renamed into place at the end.

Resuming: after every block, its shard is fsynced and ``osscar_progress.json`` in that folder records the
finished blocks (their reports, shards and tensor names) and a fingerprint of everything the output depends on
(source path, the source files' sizes and mtimes, the pruning settings, the SHA-256 of the calibration windows,
the compute device, library versions). An interrupted run keeps the folder; the same call then captures the
calibration inputs again, recomputes the inputs of the first unfinished block by running the finished blocks
once more (the pruned block read back from its shard and/or the dense one from the source, exactly as the loop
computed them; nothing is solved again), and goes on: the checkpoint is the one an uninterrupted run writes. A
finished block whose shard is missing or unreadable is pruned again; a different fingerprint raises
:class:`ResumeError` unless ``resume=False`` (start over).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .arch import get_spec, get_submodule
from .errors import OsscarError, UnsupportedModelError
from .io.save import (
    CONFIG_NAME,
    SaveError,
    _fsync_tree,
    _rewrite_config,
    check_output_folder,
    move_into_place,
    resolve_format,
)
from .io.shapes import osscar_quantization_config
from .surgery import resize_block

if TYPE_CHECKING:  # pragma: no cover
    from .pruner import OsscarPruner

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "PROGRESS_NAME", "REPORT_NAME", "ResumeError", "partial_folder", "prune_checkpoint"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
REPORT_NAME = "osscar_report.json"
PROGRESS_NAME = "osscar_progress.json"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
)


class CheckpointError(OsscarError, ValueError):
    """A checkpoint folder cannot be streamed: not a local folder, no safetensors weights, a missing, corrupt
    or inconsistent shard (the message names the file)."""


# --------------------------------------------------------------------------- reading the source checkpoint
class ShardReader:
    """The tensors of a local safetensors checkpoint (sharded with an index, or a single file), read by name."""

    def __init__(self, folder: Path, weight_map: dict[str, str] | None = None) -> None:
        self.folder = folder
        index, single = folder / INDEX_NAME, folder / SINGLE_NAME
        if weight_map is not None:
            self.weight_map = dict(weight_map)
        elif index.is_file():
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
                weight_map = data["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
            self.weight_map: dict[str, str] = {str(k): str(v) for k, v in weight_map.items()}
        elif single.is_file():
            self.weight_map = {name: SINGLE_NAME for name in self._keys(single)}
        else:
            present = sorted(p.name for p in folder.iterdir())
            raise CheckpointError(
                f"{folder} has neither {INDEX_NAME} nor {SINGLE_NAME}: streaming needs safetensors weights "
                f"(found {', '.join(present[:8]) or 'nothing'}); convert other formats by loading the model and "
                "saving it with save_pretrained"
            )
        # Every header is read (and checked against the file size) before any work starts.
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in sorted(set(self.weight_map.values())):
            path = folder / name
            if not path.is_file():
                raise CheckpointError(f"the shard {path} listed in {INDEX_NAME} does not exist")
            shapes = self._shapes(path)
            for key, shard in self.weight_map.items():
                if shard == name:
                    if key not in shapes:
                        raise CheckpointError(f"{INDEX_NAME} puts {key!r} in {path}, which does not hold it")
                    self.shapes[key] = shapes[key]

    @staticmethod
    def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(
                f"cannot read the safetensors file {path}: {exc} (is it truncated or corrupt?)") from None

    @staticmethod
    def _keys(path: Path) -> list[str]:
        return list(ShardReader._shapes(path))

    def files(self, names: list[str]) -> list[str]:
        return sorted({str(self.folder / self.weight_map[name]) for name in names})

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, opening each shard once."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for shard, keys in by_shard.items():
            path = self.folder / shard
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in keys:
                        tensors[key] = handle.get_tensor(key)
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"cannot read {keys[0]!r} from the safetensors file {path}: {exc}") from None
        return tensors


def _materialise(block: nn.Module, reader: ShardReader, keys: list[str], block_prefix: str) -> None:
    tensors = reader.read(keys)
    _load(block, {k[len(block_prefix):]: v for k, v in tensors.items()}, block_prefix.rstrip("."),
          reader.files(keys), strict=True)


def _release_memory() -> None:
    """Give freed host memory back to the system (glibc keeps freed arenas mapped otherwise)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            pass


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


# --------------------------------------------------------------------------- resuming
class ResumeError(OsscarError, ValueError):
    """An interrupted streaming run left a partial folder, but with different settings or source."""


def partial_folder(target: Path) -> Path:
    """Where :func:`prune_checkpoint` builds the checkpoint for ``target`` (kept when a run is interrupted)."""
    return target.parent / f".{target.name}.osscar-partial"


def _fingerprint(source: Path, reader: ShardReader, pruner: OsscarPruner, windows: torch.Tensor,
                 device: torch.device) -> dict[str, Any]:
    """Everything the output depends on: a partial run resumes only when all of it is unchanged."""
    import transformers

    from . import __version__
    from .config import describe_dataset

    files = {}
    names = {CONFIG_NAME, *reader.weight_map.values()} | ({INDEX_NAME} if (source / INDEX_NAME).is_file() else set())
    for name in sorted(names):
        stat = (source / name).stat()
        files[name] = [stat.st_size, stat.st_mtime_ns]
    cfg = pruner.config
    return json.loads(json.dumps({
        "source": os.path.realpath(source),
        "source_files": files,
        "config": cfg.to_dict() | {"dataset": describe_dataset(cfg.dataset, cfg.text_column)},
        "calibration": {"shape": list(windows.shape),
                        "sha256": hashlib.sha256(windows.contiguous().cpu().numpy().tobytes()).hexdigest()},
        "device": str(device),
        "versions": {"osscar_hf": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }, default=str))


def _read_progress(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / PROGRESS_NAME).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) and data.get("version") == 1 else None
    except (OSError, ValueError):
        return None


def _write_progress(folder: Path, fingerprint: dict[str, Any], done: list[dict[str, Any]]) -> None:
    """Record the finished blocks, atomically (a crash leaves the previous record or this one)."""
    path = folder / PROGRESS_NAME
    tmp = folder / f".{PROGRESS_NAME}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"version": 1, "fingerprint": fingerprint, "blocks": done}, handle, indent=1)
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


def _finished_blocks(folder: Path, fingerprint: dict[str, Any], resume: bool) -> list[dict[str, Any]]:
    """The blocks an interrupted run in ``folder`` finished, when it can be continued; [] to start afresh."""
    if not folder.exists():
        return []
    progress = _read_progress(folder)
    if not resume or progress is None:
        if progress is not None:
            logger.warning("discarding the partial run in %s (resume=False)", folder)
        shutil.rmtree(folder)
        return []
    if progress["fingerprint"] != fingerprint:
        changes = _differences(progress["fingerprint"], fingerprint)
        raise ResumeError(
            f"{folder} holds an interrupted run with other settings or another source ({'; '.join(changes[:6])}); "
            "run again with the same settings to continue it, or pass resume=False to discard it and start over"
        )
    done: list[dict[str, Any]] = []
    for entry in progress["blocks"]:
        try:
            shapes = ShardReader._shapes(folder / entry["shard"])
        except CheckpointError as exc:
            logger.warning("block %d of the partial run must be pruned again: %s", len(done), exc)
            break
        if sorted(shapes) != sorted(entry["tensors"]):
            break
        done.append(entry)
    logger.info("resuming the interrupted run in %s after %d finished blocks", folder, len(done))
    return done


def _block_report(data: dict[str, Any]) -> Any:
    from .report import BlockReport, ConsumerReport

    data = dict(data)
    data["attention"] = ConsumerReport(**data["attention"])
    data["mlp"] = ConsumerReport(**data["mlp"])
    return BlockReport(**data)


# --------------------------------------------------------------------------- the output folder
def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_target(source: Path, target: Path, overwrite: bool) -> None:
    if _same_folder(source, target):
        raise SaveError(f"refusing to write the pruned checkpoint into {str(target)!r}: it is the dense checkpoint's "
                        "own folder. Choose another output folder.")
    if os.path.realpath(source).startswith(os.path.realpath(target) + os.sep):
        raise SaveError(f"refusing to write the pruned checkpoint into {str(target)!r}: the dense checkpoint "
                        f"{str(source)!r} is inside it")
    check_output_folder(target, overwrite)


def _write_card(model: nn.Module, pruner: OsscarPruner, folder: Path) -> None:
    """The osscar model card (README.md), as a model pruned in memory and saved would have it."""
    from .io.save import attach_run, write_model_card

    attach_run(model, pruner.report, pruner.config)
    write_model_card(model, folder)


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
def prune_checkpoint(
    pruner: OsscarPruner,
    model_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = True,
) -> Path:
    """Prune the safetensors checkpoint in ``model_path`` block by block into ``output_dir``; return its path.

    See :meth:`osscar_hf.OsscarPruner.prune_checkpoint`.
    """
    from accelerate import init_empty_weights
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    from .capture import capture_block_inputs
    from .evaluation import count_parameters
    from .pipeline import BlockStream, announce_block
    from .pruner import update_model_config

    start = time.perf_counter()
    source = Path(model_path)
    if not source.is_dir():
        raise CheckpointError(
            f"{os.fspath(model_path)!r} is not a local folder: prune_checkpoint streams a checkpoint from disk. For a "
            "Hub model, download it first (huggingface_hub.snapshot_download(repo_id)) and pass the folder"
        )
    source = source.absolute()
    target = Path(output_dir).absolute()
    _check_target(source, target, overwrite)
    if not (source / CONFIG_NAME).is_file():
        raise CheckpointError(f"{source} has no {CONFIG_NAME}")
    config = AutoConfig.from_pretrained(source)
    try:
        if osscar_quantization_config(config) is not None:
            raise UnsupportedModelError(
                "this checkpoint was already pruned by osscar_hf; prune the dense checkpoint instead")
    except OsscarError as exc:
        if isinstance(exc, UnsupportedModelError):
            raise
        raise UnsupportedModelError(f"{exc}; osscar_hf prunes full-precision models") from None
    spec = get_spec(config)
    reader = ShardReader(source)
    user_tokenizer = tokenizer
    if tokenizer is None and any((source / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as exc:  # noqa: BLE001 - token-id calibration data needs no tokenizer
            logger.warning("could not load the tokenizer of %s (%s); calibrating without one", source, exc)

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
                f"{key!r} in {source / reader.weight_map[key]} has shape {list(reader.shapes[key])} but the model "
                f"built from {CONFIG_NAME} expects {list(expected[key].shape)}: do the weights and config.json belong "
                "together?"
            )
        if key.startswith(prefix):
            index = int(key[len(prefix):].split(".", 1)[0])
            block_keys[index].append(key)
        else:
            other_keys.append(key)

    settings = pruner._settings(model, spec)
    # Non-block weights: load, tie, check that nothing outside the blocks is still on meta.
    _load(model, reader.read(other_keys), "the embeddings and head", reader.files(other_keys), strict=False)
    model.tie_weights()
    missing = sorted(n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(prefix))
    if missing:
        raise CheckpointError(f"the checkpoint in {source} has no weights for {missing[:5]}")
    for i, keys in enumerate(block_keys):
        names = {f"{prefix}{i}.{n}" for n in blocks[i].state_dict()}
        if names - set(keys):
            raise CheckpointError(
                f"the checkpoint in {source} has no weights for {sorted(names - set(keys))[:5]} (block {i})")

    windows = pruner.calibration_windows(model, tokenizer)
    params_before = count_parameters(model)
    logger.info(
        "OSSCAR (streaming %s): %s, %d blocks; keeping %d/%d attention groups and %d/%d neurons per block; "
        "%d windows of %d tokens", source, spec.name, num_blocks, settings.attention.num_keep,
        settings.num_attention_groups, settings.mlp.num_keep, settings.num_neurons, *windows.shape,
    )

    fingerprint = _fingerprint(source, reader, pruner, windows, settings.device)
    tmp = partial_folder(target)
    done = _finished_blocks(tmp, fingerprint, resume)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(exist_ok=True)
    try:
        with torch.no_grad():
            captured = capture_block_inputs(model, blocks, windows, batch_size=pruner.config.batch_size,
                                            storage_device=settings.storage_device)
        weight_map: dict[str, str] = {}
        total_size = 0
        shards = num_blocks + 1
        # The non-block weights, as in the source (a tied head is not written twice), then back to meta.
        state = model.state_dict()
        seen: set[int] = set()
        others: dict[str, torch.Tensor] = {}
        for key in other_keys:
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
        _release_memory()

        stream = BlockStream(spec, captured, settings)
        reports = []
        bar = tqdm(total=num_blocks, desc="OSSCAR pruning (streaming)", unit="block", disable=not progress)
        try:
            # Blocks an interrupted run finished: their next inputs are recomputed (one forward per block, the
            # dense block from the source and/or the pruned one from its shard), nothing is solved again.
            for i, entry in enumerate(done):
                block, block_prefix = blocks[i], f"{prefix}{i}."
                report = _block_report(entry["report"])
                if not settings.propagate or settings.dense_targets:
                    _materialise(block, reader, block_keys[i], block_prefix)
                    stream.replay(i, block, pruned=False)
                    block.to("meta")
                shape = {"num_key_value_heads": report.attention.kept,
                         "num_attention_heads": report.attention.kept * settings.n_rep, "ffn_dim": report.mlp.kept}
                with torch.device("cpu"):
                    resize_block(block, spec, shape, n_rep=settings.n_rep, head_dim=settings.head_dim)
                if settings.propagate:
                    pruned = ShardReader(tmp, {k: entry["shard"] for k in entry["tensors"]})
                    _materialise(block, pruned, entry["tensors"], block_prefix)
                    stream.replay(i, block, pruned=True)
                    block.to("meta")
                stream.finish_replay()
                _release_memory()
                weight_map.update(dict.fromkeys(entry["tensors"], entry["shard"]))
                total_size += entry["bytes"]
                reports.append(report)
                bar.update(1)
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
                _release_memory()
                reports.append(report)
                announce_block(bar, report)
        finally:
            bar.close()
        del stream, captured

        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        solved = any(b.attention.solved or b.mlp.solved for b in reports)
        if solved:
            update_model_config(model, spec, n_rep=settings.n_rep, head_dim=settings.head_dim,
                                osscar_config=pruner.config)
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        _rewrite_config(tmp, model, resolve_format(model, "auto"))
        if (source / GENERATION_CONFIG_NAME).is_file():
            shutil.copy2(source / GENERATION_CONFIG_NAME, tmp / GENERATION_CONFIG_NAME)
        copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
        for name in copied:
            shutil.copy2(source / name, tmp / name)
        if user_tokenizer is not None:
            user_tokenizer.save_pretrained(tmp)
        pruner.report = pruner._build_report(model, windows, params_before, count_parameters(model), start, reports)
        pruner.report.to_json(tmp / REPORT_NAME)
        if solved:
            _write_card(model, pruner, tmp)
        (tmp / PROGRESS_NAME).unlink()
        _fsync_tree(tmp)
        move_into_place(tmp, target)
    except BaseException:
        if any(tmp.glob("model-*.safetensors")) and (tmp / PROGRESS_NAME).is_file():
            logger.error("pruning stopped after %d of %d blocks; the finished blocks are kept in %s: run "
                         "prune_checkpoint again with the same settings to continue", len(done), num_blocks, tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote the pruned checkpoint to %s", target)
    return target
