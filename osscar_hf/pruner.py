"""``OsscarPruner``: the public entry point of in-memory pruning."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .arch import ArchSpec, get_spec, get_submodule
from .arch.experts import dense_layers_problem
from .arch.vision import is_vision_model
from .calibration import build_window_sets
from .config import OsscarConfig
from .distributed import Ranks, guard, process_ranks
from .errors import CalibrationDataError, OsscarConfigError, OsscarError, UnsupportedModelError
from .io.model_config import update_model_config
from .io.save import attach_run, pruning_record
from .io.shapes import osscar_quantization_config
from .pipeline import (
    activation_space,
    InMemoryBlocks,
    PruneRun,
    calibration_seq_len,
    capture,
    finish_run,
    plan_sizes,
    prune_blocks,
    start_run,
)
from .pipeline.vision import prune_channels
from .report import PruneReport
from .streaming import prune_checkpoint
from .self_calibration import is_self_dataset, sample_token_windows
from .surgery import block_shape

__all__ = ["OsscarPruner", "check_prunable_config", "update_model_config"]

logger = logging.getLogger(__name__)

_ALREADY_PRUNED = "this model was already pruned by osscar_hf; prune the dense model instead"


class OsscarPruner:
    """Prune a ``PreTrainedModel`` in place with OSSCAR, in the style of transformers' quantizers.

        pruner = OsscarPruner(OsscarConfig(attention_sparsity=0.25, mlp_sparsity=0.5, dataset=texts))
        pruned = pruner.prune(model, tokenizer)
        pruner.report.to_json("report.json")

    Every input is validated before the model is touched: a bad config, dataset or unsupported model
    raises and leaves the model as it was.
    """

    def __init__(self, config: OsscarConfig) -> None:
        if not isinstance(config, OsscarConfig):
            raise OsscarConfigError(f"OsscarPruner needs an OsscarConfig, got {type(config).__name__}")
        config.check_method()
        self.config = config
        self.report: PruneReport | None = None

    def _check_model(self, model: nn.Module, spec: ArchSpec) -> None:
        check_prunable_config(model.config)
        if pruning_record(model) is not None:  # pruned in this process: the record is on the model, not its config
            raise UnsupportedModelError(_ALREADY_PRUNED)
        spec.check_model(model)
        if any(p.device.type == "meta" for p in model.parameters()):
            raise UnsupportedModelError(
                "the model has parameters on the meta device (offloaded with a device_map?); load it fully "
                "on one device to prune it in memory"
            )
        blocks = get_submodule(model, spec.blocks)
        m, n_rep, head_dim = spec.group_geometry(model.config)
        for i, block in enumerate(blocks):
            if block_shape(block, spec, n_rep=n_rep, head_dim=head_dim)["num_key_value_heads"] != m:
                raise UnsupportedModelError(f"block {i} does not have the {m} KV heads its config declares")

    def calibration_windows(self, model: nn.Module, tokenizer: Any = None) -> torch.Tensor:
        """The (num_samples x seq_len) token windows this pruner calibrates on."""
        return self.calibration_window_sets(model, tokenizer)[0]

    def calibration_window_sets(self, model: nn.Module, tokenizer: Any = None, *, held_out: int = 0,
                                progress: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The calibration windows and ``held_out`` more windows of the same data that overlap none of them (None
        when ``held_out`` is 0), on which a global allocation measures damage. With ``dataset="self"`` both are
        sampled from ``model`` (see :mod:`osscar_hf.self_calibration`)."""
        cfg = self.config
        if cfg.dataset is None:
            raise CalibrationDataError(
                "OsscarConfig.dataset is required: pass a list of strings, a path to a .txt/.jsonl/.parquet "
                "file, a datasets.Dataset, token ids, one of 'c4', 'wikitext2', 'ptb', or 'self' (text sampled "
                "from the model)"
            )
        seq_len = calibration_seq_len(cfg, model.config)
        if seq_len < cfg.seq_len:
            logger.info("seq_len %d capped at the model context %d", cfg.seq_len, seq_len)
        if is_self_dataset(cfg.dataset):
            windows = sample_token_windows(model, count=cfg.num_samples, seq_len=seq_len, seed=cfg.seed,
                                           progress=progress)
            held = (sample_token_windows(model, count=held_out, seq_len=seq_len, seed=cfg.seed, stream="held_out",
                                         progress=progress) if held_out else None)
        else:
            windows, held = build_window_sets(
                cfg.dataset, tokenizer, num_samples=cfg.num_samples, seq_len=seq_len, seed=cfg.seed,
                held_out=held_out, text_column=cfg.text_column,
            )
        vocab = model.get_input_embeddings().num_embeddings
        for ids in (windows, held):
            if ids is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
                raise CalibrationDataError(
                    f"calibration token ids span [{int(ids.min())}, {int(ids.max())}] but the model's "
                    f"vocabulary has {vocab} entries: is the tokenizer the model's own?"
                )
        return windows, held

    def prune(self, model: nn.Module, tokenizer: Any = None, *, progress: bool = True) -> nn.Module:
        """Prune ``model`` in place and return it; ``self.report`` records what was done.

        Under ``torch.distributed`` (an initialised process group, or torchrun's environment: then the group is
        initialised here and destroyed at the end) every rank calls this with the same model and settings; each runs
        the block forwards on its share of the calibration windows, and every rank returns the same pruned model
        (see ``docs/distributed.md``). Progress bars are shown on rank 0 only.

        A CNN (``ResNetForImageClassification``, ``MobileNetV2ForImageClassification``; see ``docs/vision.md``) takes
        ``channel_sparsity`` and its image processor in place of ``tokenizer``, and is pruned in one process."""
        if is_vision_model(model):
            self.report = prune_channels(self.config, model, tokenizer, progress=progress)
            return model
        with process_ranks(self.config.resolved_device()) as ranks, guard(ranks):
            return self._prune(model, tokenizer, ranks, progress=progress and ranks.is_main)

    def _prune(self, model: nn.Module, tokenizer: Any, ranks: Ranks, *, progress: bool) -> nn.Module:
        spec = get_spec(model)
        self._check_model(model, spec)
        run = start_run(self.config, model, spec, lambda held_out: self.calibration_window_sets(
            model, tokenizer, held_out=held_out, progress=progress), ranks)
        was_training = model.training
        model.eval()
        source = InMemoryBlocks()
        space = activation_space(run)
        try:
            # The activations' folder (on disk) is removed when this block ends, also on errors.
            with space, torch.no_grad():
                captured = capture(run, space)
                plan_sizes(run, source, captured, progress=progress)
                # prune_blocks takes the captured activations over and frees them block by block.
                reports = prune_blocks(run, source, captured, progress=progress)
        except BaseException:
            if _any_block_pruned(run):
                # Keep weights and config consistent, so what is left can still be inspected or saved.
                settings = run.settings
                update_model_config(model, spec, n_rep=settings.n_rep, head_dim=settings.head_dim,
                                    osscar_config=self.config)
                logger.error("pruning stopped by an error after some blocks were pruned: the model is partially "
                             "pruned, and its config describes its blocks as they are now")
            raise
        finally:
            model.train(was_training)
        self.report = finish_run(run, reports, activations=space.summary())
        if any(b.attention.solved or b.mlp.solved for b in reports):
            attach_run(model, self.report, self.config)
        return model

    def prune_checkpoint(
        self,
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
        """Prune the safetensors checkpoint ``model_path`` (a local folder or a Hub model id) block by block,
        without ever loading the whole model, and write the pruned checkpoint to ``output_dir``; return its path.

        The result is the checkpoint :meth:`prune` followed by :func:`osscar_hf.save_pruned` would give (the same
        tensors, in the checkpoint ``format`` of :func:`~osscar_hf.save_pruned`: ``"auto"``, ``"stock"``, ``"osscar"``
        or ``"remote_code"``; a format that cannot hold the pruned shapes is refused before any work), with
        the tokenizer files and ``generation_config.json`` of the source and ``osscar_report.json``;
        ``self.report`` is set too. Host memory holds the calibration activations and one block at a time
        (plus the embeddings and head during the capture). ``tokenizer``: used for text calibration data and
        saved with the checkpoint; by default the source's tokenizer. The source folder and a non-empty
        ``output_dir`` (unless ``overwrite=True``) are refused (``SaveError``); a missing, truncated or
        inconsistent shard raises :class:`osscar_hf.streaming.CheckpointError` naming the file.

        A Hub id (``"namespace/name"``; ``revision``: branch, tag or commit, default ``main``; ``token``,
        ``cache_dir`` and ``endpoint`` as for ``huggingface_hub.hf_hub_download``) is read through the
        huggingface_hub cache: config, index and tokenizer files first, shard headers by HTTP range requests, and
        each weight shard only when a block (or the embeddings and head) first needs it, all from the commit the
        revision resolved to at the start. Files already in the cache are not downloaded again.
        ``delete_downloaded_shards=True`` deletes each shard this run downloaded from the cache as soon as its
        blocks are done (so the disk never holds the dense and pruned models whole); files that were in the cache
        before are never deleted. An unknown, gated or unreachable repository, or one without safetensors
        weights, raises ``CheckpointError`` saying what to do.

        The checkpoint is built in a hidden folder beside ``output_dir`` (``.NAME.osscar-partial``) and renamed
        into place at the end; progress is recorded there after every block. While a run writes it holds the
        lock ``.NAME.osscar-lock`` beside ``output_dir``: a second run into the same folder raises
        :class:`osscar_hf.streaming.ConcurrentRunError` at once. When a run is interrupted, the same call
        continues from the first unfinished block and writes the same checkpoint as an uninterrupted run. A
        partial run with other settings, calibration data, dtype, device (for a GPU, also another GPU model, which
        may round differently) or source (changed files; for a Hub id, a
        revision that now resolves to another commit) raises :class:`osscar_hf.streaming.ResumeError`;
        ``resume=False`` discards it and starts over. See :mod:`osscar_hf.streaming`.

        ``map_large_allocations`` (Linux with glibc): for the duration of the call, every allocation of 1 MiB or
        more gets its own memory map, so that freed tensors do not stay resident in a fragmented heap (0.2 GiB
        of peak memory at OPT-2.7B shapes, see ``benchmarks/memory.py``). glibc cannot restore its adaptive
        threshold afterwards, so it is then fixed at 32 MiB, the most that one adapts to; a threshold
        fixed before (``MALLOC_MMAP_THRESHOLD_``, :func:`osscar_hf.host_memory.map_large_allocations`) is left
        alone. ``False`` leaves the allocator untouched.

        ``dtype``: the weights are read and written in their checkpoint's dtype (``None`` or ``"auto"``, the
        default), or cast on reading to ``"float32"``, ``"bfloat16"`` or ``"float16"`` (as
        ``from_pretrained(..., dtype=)`` would load them for :meth:`prune`); ``config.json`` records it.
        ``base_model``: the Hub id the model card names as the base model (default: ``model_path`` when it is a
        Hub id, none for a local folder).

        Under ``torch.distributed`` (as for :meth:`prune`) every rank reads its blocks from the shards and runs its
        share of the calibration windows; rank 0 alone takes the lock and writes (see ``docs/distributed.md``).
        """
        if is_self_dataset(self.config.dataset):
            raise CalibrationDataError(
                "dataset='self' samples calibration text from the dense model, which prune_checkpoint never holds "
                "in memory (it streams one block at a time); load the model and use prune(), or give calibration "
                "text")
        return prune_checkpoint(self, model_path, output_dir, tokenizer=tokenizer, overwrite=overwrite,
                                progress=progress, resume=resume, revision=revision, token=token, cache_dir=cache_dir,
                                endpoint=endpoint, delete_downloaded_shards=delete_downloaded_shards, format=format,
                                map_large_allocations=map_large_allocations, dtype=dtype,
                                base_model=base_model)


def check_prunable_config(model_config: Any) -> ArchSpec:
    """The architecture spec for a model's config (``config.json`` is enough), refusing with
    ``UnsupportedModelError`` an unsupported ``model_type``, a model quantized by another method, or one already
    pruned by osscar_hf: the checks that need no weights, for callers to run before loading any."""
    spec = get_spec(model_config)
    try:
        record = osscar_quantization_config(model_config)
    except OsscarError as exc:  # quantized by another method
        raise UnsupportedModelError(f"{exc}; osscar_hf prunes full-precision models") from None
    if record is not None:
        raise UnsupportedModelError(_ALREADY_PRUNED)
    dense = dense_layers_problem(model_config, spec.experts) if spec.experts is not None else None
    if dense is not None:  # a mixture of experts with dense-MLP blocks
        raise UnsupportedModelError(f"model_type {model_config.model_type!r}: {dense}")
    return spec


def _any_block_pruned(run: PruneRun) -> bool:
    settings = run.settings
    dense = {**settings.attention_layout.dense_shape(), "ffn_dim": settings.num_neurons}
    return any(block_shape(block, run.spec, n_rep=settings.n_rep, head_dim=settings.head_dim) != dense
               for block in run.blocks)
