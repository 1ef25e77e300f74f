"""``OsscarPruner``: the public entry point of in-memory pruning."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .activations import ActivationSpace
from .arch import ArchSpec, get_spec, get_submodule
from .calibration import build_calibration_windows
from .capture import capture_block_inputs
from .config import OsscarConfig, describe_dataset, keep_count
from .errors import CalibrationDataError, OsscarConfigError, OsscarError, UnsupportedModelError
from .evaluation import count_parameters
from .io.save import attach_run, mark_pruned, pruning_record
from .io.shapes import stock_config_expresses
from .pipeline import LoopSettings, ProblemSettings, prune_blocks
from .report import PruneReport
from .surgery import block_shape

logger = logging.getLogger(__name__)


def model_context_length(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def update_model_config(
    model: nn.Module, spec: ArchSpec, *, n_rep: int, head_dim: int, osscar_config: OsscarConfig | None = None
) -> list[dict[str, int]]:
    """Write the pruned shapes into ``model.config``; return every block's shape.

    When all blocks share one shape, the stock fields are updated where the architecture's config can
    express it (FFN width always; head counts only for configs with an explicit ``head_dim`` and a head
    count that divides ``hidden_size``, as transformers' validation requires). If the stock config then
    describes every block, the model is a plain smaller model and its config gets nothing else (plain
    ``save_pretrained`` writes a checkpoint vanilla transformers loads). Otherwise
    ``config.quantization_config`` becomes ``osscar_config.for_model_config(shapes)``: the pruning settings,
    the per-block shapes and the library versions, which the osscar quantizer reads on load.

    Either way the model keeps that record (see :func:`osscar_hf.io.pruning_record`), and its
    ``save_pretrained`` refuses the folder the dense model was loaded from.
    """
    config = model.config
    blocks = get_submodule(model, spec.blocks)
    shapes = [block_shape(block, spec, n_rep=n_rep, head_dim=head_dim) for block in blocks]
    if all(shape == shapes[0] for shape in shapes):
        shape = shapes[0]
        setattr(config, spec.config_ffn, shape["ffn_dim"])
        heads = shape["num_attention_heads"]
        if spec.config_has_head_dim and heads > 0 and config.hidden_size % heads == 0:
            config.head_dim = head_dim
            setattr(config, spec.config_heads, heads)
            if spec.config_kv_heads is not None:
                setattr(config, spec.config_kv_heads, shape["num_key_value_heads"])
    record = (osscar_config if osscar_config is not None else OsscarConfig()).for_model_config(shapes)
    if stock_config_expresses(config, shapes, spec):
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
    else:
        config.quantization_config = record
    mark_pruned(model, record)
    return shapes


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
        self.config = config
        self.report: PruneReport | None = None

    def _settings(self, model: nn.Module, spec: ArchSpec) -> LoopSettings:
        cfg = self.config
        m, n_rep, head_dim = spec.group_geometry(model.config)
        neurons = spec.ffn_dim(model.config)
        dtype = cfg.torch_solver_dtype()
        iters = cfg.local_search_iters if cfg.local_search else 0
        attention = ProblemSettings(
            num_keep=keep_count(m, cfg.attention_sparsity), group_size=n_rep * head_dim, step=cfg.attention_step,
            swap_size=cfg.attention_swap_size, local_search_iters=iters, damping=cfg.damping, dtype=dtype,
        )
        mlp = ProblemSettings(
            num_keep=keep_count(neurons, cfg.mlp_sparsity), group_size=1, step=cfg.mlp_step,
            swap_size=cfg.mlp_swap_size, local_search_iters=iters, damping=cfg.damping, dtype=dtype,
        )
        return LoopSettings(
            attention=attention, mlp=mlp, num_attention_groups=m, n_rep=n_rep, head_dim=head_dim,
            num_neurons=neurons, device=cfg.resolved_device(), storage_device=torch.device("cpu"),
            propagate=cfg.propagate, dense_targets=cfg.dense_targets,
            activation_storage=cfg.activation_storage, activation_dir=cfg.activation_dir,
        )

    def _check_model(self, model: nn.Module, spec: ArchSpec) -> None:
        try:
            record = pruning_record(model)
        except OsscarError as exc:  # quantized by another method
            raise UnsupportedModelError(f"{exc}; osscar_hf prunes full-precision models") from None
        if record is not None:
            raise UnsupportedModelError("this model was already pruned by osscar_hf; prune the dense model instead")
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
        cfg = self.config
        if cfg.dataset is None:
            raise CalibrationDataError(
                "OsscarConfig.dataset is required: pass a list of strings, a path to a .txt/.jsonl/.parquet "
                "file, a datasets.Dataset, token ids, or one of 'c4', 'wikitext2', 'ptb'"
            )
        context = model_context_length(model.config)
        seq_len = min(cfg.seq_len, context) if context else cfg.seq_len
        if seq_len < cfg.seq_len:
            logger.info("seq_len %d capped at the model context %d", cfg.seq_len, seq_len)
        windows = build_calibration_windows(
            cfg.dataset, tokenizer, num_samples=cfg.num_samples, seq_len=seq_len, seed=cfg.seed,
            text_column=cfg.text_column,
        )
        vocab = model.get_input_embeddings().num_embeddings
        if int(windows.max()) >= vocab or int(windows.min()) < 0:
            raise CalibrationDataError(
                f"calibration token ids span [{int(windows.min())}, {int(windows.max())}] but the model's "
                f"vocabulary has {vocab} entries: is the tokenizer the model's own?"
            )
        return windows

    def prune(self, model: nn.Module, tokenizer: Any = None, *, progress: bool = True) -> nn.Module:
        """Prune ``model`` in place and return it; ``self.report`` records what was done."""
        start = time.perf_counter()
        spec = get_spec(model)
        self._check_model(model, spec)
        settings = self._settings(model, spec)
        windows = self.calibration_windows(model, tokenizer)
        params_before = count_parameters(model)
        was_training = model.training
        model.eval()
        logger.info(
            "OSSCAR: %s, %d blocks; keeping %d/%d attention groups and %d/%d neurons per block; %d windows of %d tokens",
            spec.name, len(get_submodule(model, spec.blocks)), settings.attention.num_keep,
            settings.num_attention_groups, settings.mlp.num_keep, settings.num_neurons, *windows.shape,
        )
        space = ActivationSpace.for_settings(settings)
        try:
            # The activations' folder (on disk) is removed when this block ends, also on errors.
            with space, torch.no_grad():
                captured = capture_block_inputs(
                    model, get_submodule(model, spec.blocks), windows, batch_size=self.config.batch_size,
                    storage_device=settings.storage_device, activations=space,
                )
                # prune_blocks takes the captured activations over and frees them block by block.
                blocks = prune_blocks(model, spec, captured, settings, progress=progress)
        except BaseException:
            if _any_block_pruned(model, spec, settings):
                # Keep weights and config consistent, so what is left can still be inspected or saved.
                update_model_config(
                    model, spec, n_rep=settings.n_rep, head_dim=settings.head_dim, osscar_config=self.config
                )
                logger.error("pruning stopped by an error after some blocks were pruned: the model is partially "
                             "pruned, and its config describes its blocks as they are now")
            raise
        finally:
            model.train(was_training)
        solved = any(b.attention.solved or b.mlp.solved for b in blocks)
        if solved:
            update_model_config(
                model, spec, n_rep=settings.n_rep, head_dim=settings.head_dim, osscar_config=self.config
            )
        self.report = self._build_report(model, windows, params_before, count_parameters(model), start, blocks,
                                         activations=space.summary())
        if solved:
            attach_run(model, self.report, self.config)
        return model

    def _build_report(
        self, model: nn.Module, windows: torch.Tensor, params_before: int, params_after: int, start: float,
        blocks: list[Any], activations: dict[str, Any] | None = None,
    ) -> PruneReport:
        return PruneReport(
            model_type=model.config.model_type,
            config=self.config.to_dict() | {"dataset": describe_dataset(self.config.dataset, self.config.text_column)},
            calibration={"num_samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                         "tokens": int(windows.numel())},
            parameters_before=params_before,
            parameters_after=params_after,
            total_seconds=time.perf_counter() - start,
            blocks=blocks,
            activations=activations,
        )

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
        """
        from .streaming import prune_checkpoint

        return prune_checkpoint(self, model_path, output_dir, tokenizer=tokenizer, overwrite=overwrite,
                                progress=progress, resume=resume, revision=revision, token=token, cache_dir=cache_dir,
                                endpoint=endpoint, delete_downloaded_shards=delete_downloaded_shards, format=format,
                                map_large_allocations=map_large_allocations, dtype=dtype,
                                base_model=base_model)


def _any_block_pruned(model: nn.Module, spec: ArchSpec, settings: LoopSettings) -> bool:
    dense = {"num_key_value_heads": settings.num_attention_groups,
             "num_attention_heads": settings.num_attention_groups * settings.n_rep, "ffn_dim": settings.num_neurons}
    return any(block_shape(block, spec, n_rep=settings.n_rep, head_dim=settings.head_dim) != dense
               for block in get_submodule(model, spec.blocks))
