"""Saving pruned models: stock checkpoints when the stock config can say it, the osscar format otherwise, or
(on request) the remote-code format, which loads with ``trust_remote_code=True`` and no osscar_hf.

:func:`save_pruned` is the library-level save: it refuses the dense model's own folder and a non-empty
folder (unless ``overwrite=True``), writes into a temporary folder beside the target and renames it into
place, so an interrupted save never leaves a folder that looks like a checkpoint at the target path.

A model pruned in memory also gets a guarded ``save_pretrained`` (set on the instance by the pruner): it
keeps transformers' semantics but refuses the folder the dense model was loaded from.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..arch.vision import is_vision_model
from ..config import OsscarConfig
from ..errors import OutputConflictError, SaveError
from .remote_code import (
    base_model_type,
    remote_code_config,
    remote_code_names,
    strip_remote_code,
    write_remote_code_files,
)
from .shapes import (
    config_block_shape,
    osscar_quantization_config,
    read_block_shapes,
    spec_of,
    stock_config_expresses,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS", "OutputConflictError", "SaveError", "attach_run", "fsync_tree", "mark_pruned", "model_card",
    "pruning_record", "resolve_format", "rewrite_config", "save_pruned", "write_model_card",
]

FORMATS = ("auto", "stock", "osscar", "remote_code")
CONFIG_NAME = "config.json"


# --------------------------------------------------------------------------- the record on a pruned model
def pruning_record(model: nn.Module) -> OsscarConfig | None:
    """The :class:`OsscarConfig` (with ``block_shapes``) describing how ``model`` was pruned, or ``None``.

    Read from ``model.config.quantization_config`` (checkpoints in the osscar format, and in-memory models
    whose shapes the stock config cannot express), from the record the pruner leaves on the model, or from
    ``config.osscar_pruning`` and ``config.osscar_block_shapes`` (models loaded from a remote-code checkpoint).
    """
    record = osscar_quantization_config(model.config)
    if record is None:
        record = getattr(model, "_osscar_config", None)
    pruning = getattr(model.config, "osscar_pruning", None)
    if record is None and isinstance(pruning, dict):
        shapes = getattr(model.config, "osscar_block_shapes", None)
        record = OsscarConfig.from_dict({**pruning, "block_shapes": shapes})
    return record


def _dense_source(config: Any) -> str | None:
    name = getattr(config, "_name_or_path", None) or ""
    return os.path.realpath(name) if name and os.path.isdir(name) else None


def mark_pruned(model: nn.Module, record: OsscarConfig) -> None:
    """Leave the pruning record and the dense model's folder on ``model``, and guard its ``save_pretrained``."""
    model._osscar_config = record
    if getattr(model, "_osscar_source", None) is None:
        model._osscar_source = _dense_source(model.config)
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = _GuardedSavePretrained(model)


def _same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_not_dense_source(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Raise ``SaveError`` when ``save_directory`` is the folder the dense model was loaded from."""
    source = getattr(model, "_osscar_source", None)
    if source and _same_folder(save_directory, source):
        raise SaveError(
            f"refusing to save the pruned model into {os.fspath(save_directory)!r}: the dense model it was pruned "
            "from was loaded from that folder, and saving there would overwrite the dense weights and config. "
            "Save the pruned model to another folder."
        )


class _GuardedSavePretrained:
    """A pruned model's ``save_pretrained``: transformers' own, with every argument passed on as given, refusing
    the dense model's folder, then writing the model card beside the weights (see :func:`write_model_card`).

    A small object rather than a bound method, so that ``copy.deepcopy`` and pickling (``torch.save`` of
    the whole model) carry it along, bound to the copy.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.__doc__ = type(model).save_pretrained.__doc__

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        check_not_dense_source(self.model, save_directory)
        result = type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)
        write_model_card(self.model, save_directory)
        return result


class _PushWithCard:
    """A pruned model's ``push_to_hub``: transformers' own, with every argument passed on as given, then the osscar
    model card as the repository's README.md, in a second commit (transformers' push writes the Hub's card or a
    generic one over the card ``save_pretrained`` wrote; its later pushes keep the card they find). The card gets
    the ``tags`` the push was given. For one commit holding everything, and errors that say what to do, use
    :func:`osscar_hf.hub.push_pruned`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.__doc__ = type(model).push_to_hub.__doc__

    def __call__(self, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        info = type(self.model).push_to_hub(self.model, repo_id, *args, **kwargs)
        card = model_card(self.model)
        if card is not None:
            _push_card(card, info, repo_id, kwargs)
        return info


def _push_card(card: Any, info: Any, repo_id: str, push_kwargs: dict[str, Any]) -> None:
    """Commit ``card`` as README.md where the model push ``info`` went: its branch, or its pull request."""
    from huggingface_hub import HfApi  # the endpoint in force now (HF_ENDPOINT), like transformers' own push

    tags = list(card.data.tags or [])
    card.data.tags = tags + [tag for tag in push_kwargs.get("tags") or [] if tag not in tags]
    repo_url = getattr(info, "repo_url", None)
    HfApi().upload_file(
        path_or_fileobj=str(card).encode("utf-8"),
        path_in_repo="README.md",
        repo_id=getattr(repo_url, "repo_id", None) or repo_id,
        token=push_kwargs.get("token"),
        revision=getattr(info, "pr_revision", None) or push_kwargs.get("revision"),
        commit_message="Add the osscar model card",
    )


def attach_run(model: nn.Module, report: Any, config: OsscarConfig) -> None:
    """Keep a pruning run's report and settings on ``model``: its ``save_pretrained`` then writes the model
    card beside the weights, and its ``push_to_hub`` uploads that card with them."""
    model._osscar_report = report
    model._osscar_run_config = config
    if callable(getattr(type(model), "push_to_hub", None)):
        model.push_to_hub = _PushWithCard(model)


def model_card(model: nn.Module, checkpoint_format: str | None = None) -> Any:
    """The osscar model card of a model pruned in this process (``None`` for other models).

    ``checkpoint_format``: ``"stock"``, ``"osscar"`` or ``"remote_code"`` when known (it picks the loading
    instructions), see :func:`osscar_hf.card.build_model_card`.
    """
    report = getattr(model, "_osscar_report", None)
    if report is None:
        return None
    from ..card import build_model_card

    name = getattr(model.config, "_name_or_path", "") or ""
    base_model = name if name and not os.path.exists(name) else None  # a Hub id, not a local folder
    return build_model_card(report, base_model=base_model, config=model._osscar_run_config,
                            checkpoint_format=checkpoint_format)


_CARD_MARKER = "- structured-pruning"


def write_model_card(
    model: nn.Module, folder: str | os.PathLike, checkpoint_format: str | None = None
) -> Path | None:
    """Write ``model``'s card as ``folder/README.md`` (atomically); a README that osscar_hf did not write
    is left alone. ``checkpoint_format``: see :func:`model_card`."""
    card = model_card(model, checkpoint_format)
    if card is None:
        return None
    path = Path(folder) / "README.md"
    if path.exists() and _CARD_MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        logger.warning("%s exists and was not written by osscar_hf: not replacing it with the model card", path)
        return None
    tmp = path.with_name(f".README.md.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(str(card), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- format
def _why_not_stock(model: nn.Module, shapes: list[dict[str, int]]) -> str:
    if is_vision_model(model):
        return (f"no field of the stock {type(model.config).__name__} sets a residual block's inner widths, which "
                "the pruning changed")
    implied = config_block_shape(model.config)
    if any(shape != shapes[0] for shape in shapes):
        different = sorted({i for i, shape in enumerate(shapes) if shape != shapes[0]})
        return f"the blocks do not all have the same shape (block 0: {shapes[0]}; blocks {different[:10]} differ)"
    shape = shapes[0]
    reason = f"every block has {shape} but a stock model built from the config would have {implied}"
    if shape["num_key_value_heads"] != implied["num_key_value_heads"]:
        if not spec_of(model).config_has_head_dim:
            family = base_model_type(model.config)
            reason += f" ({family} derives head_dim from hidden_size // num_attention_heads)"
        elif shape["num_attention_heads"] == 0:
            reason += " (no stock attention has zero heads)"
        else:
            reason += (
                f" (transformers requires hidden_size={spec_of(model).shape_config(model.config).hidden_size} to be "
                "a multiple of "
                f"num_attention_heads={shape['num_attention_heads']})"
            )
    return reason


def resolve_format(model: nn.Module, format: str = "auto") -> str:
    """``"stock"``, ``"osscar"`` or ``"remote_code"``: the format :func:`save_pruned` writes for ``model`` and
    ``format`` (``"auto"`` picks stock or osscar); ``SaveError`` says why a format cannot be written."""
    if format not in FORMATS:
        raise SaveError(f"format must be one of {list(FORMATS)}, got {format!r}")
    shapes = read_block_shapes(model)
    if format == "remote_code" and is_vision_model(model):
        raise SaveError("the remote-code format holds language models only so far; save a CNN with format='osscar' "
                        "(or 'auto'), which loads after `import osscar_hf` (docs/vision.md)")
    if format == "remote_code":
        remote_code_names(base_model_type(model.config))  # transformers has the family's classes
        return format
    expressible = stock_config_expresses(model.config, shapes)
    if format == "stock" and not expressible:
        raise SaveError(
            f"cannot save a stock checkpoint: {_why_not_stock(model, shapes)}. Use format='osscar' (or 'auto'; "
            "loading it then needs `import osscar_hf`) or format='remote_code' (loads with trust_remote_code=True)"
        )
    resolved = ("stock" if expressible else "osscar") if format == "auto" else format
    if resolved == "osscar" and pruning_record(model) is None:
        asked = "format='osscar'" if format == "osscar" else "format='auto' picks the osscar format here, which"
        raise SaveError(
            f"{asked} needs the record of an osscar_hf pruning (model.config.quantization_config or the pruner's "
            "record), and this model has none: save it with format='stock' (when the stock config expresses its "
            "shapes) or format='remote_code'"
        )
    return resolved


# --------------------------------------------------------------------------- save
def rewrite_config(folder: Path, model: nn.Module, fmt: str) -> None:
    """Turn ``folder/config.json`` (as ``save_pretrained`` wrote it for ``model``) into format ``fmt``
    (``"stock"``, ``"osscar"`` or ``"remote_code"``, as :func:`resolve_format` returns), writing or removing
    the remote-code files beside it."""
    if fmt not in FORMATS or fmt == "auto":
        raise SaveError(f"rewrite_config needs a resolved format ('stock', 'osscar' or 'remote_code'), "
                        f"got {fmt!r}")
    path = folder / CONFIG_NAME
    # A model loaded from a remote-code checkpoint wrote that format's config and files: start from stock.
    data = strip_remote_code(json.loads(path.read_text(encoding="utf-8")), folder)
    shapes = read_block_shapes(model)
    record = pruning_record(model)
    if record is not None and record.block_shapes != shapes:  # the record predates a change of shapes
        record = record.for_model_config(shapes)
    if fmt == "stock":
        data.pop("quantization_config", None)
    elif fmt == "osscar":
        data["quantization_config"] = record.to_dict()
    else:
        data, names = remote_code_config(data, model, spec_of(model), shapes, record)
        write_remote_code_files(folder, names)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk, so that the rename publishing it cannot leave a
    checkpoint with missing or empty files after a crash."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for directory in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:  # pragma: no cover - platforms without directory fds
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def output_path(folder: str | os.PathLike) -> Path:
    """The absolute path to write an output folder at; a symbolic link there stands for the folder it points to
    (so the temporary folder is made beside that one, on its file system)."""
    path = Path(folder).expanduser().absolute()
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def check_output_folder(target: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder unless ``overwrite``."""
    if target.exists():
        if not target.is_dir():
            raise SaveError(f"{str(target)!r} exists and is not a folder")
        if not overwrite and any(target.iterdir()):
            raise SaveError(
                f"refusing to save into {str(target)!r}: the folder is not empty ({_describe_entries(target)}); "
                "pass overwrite=True to replace it"
            )


def move_into_place(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Rename the finished folder ``tmp`` to ``target``.

    With ``overwrite`` a previous ``target`` is replaced as a whole (and put back if that fails). Without it,
    ``target`` must still be missing or an empty folder: an empty folder is removed (``rmdir`` fails on a
    folder that is not empty) and ``tmp`` renamed in its place (``rename`` fails on a folder that is not
    empty, or on Windows on anything there), so a file that appeared there while the checkpoint was being
    written is never replaced (:class:`OutputConflictError`, with ``tmp`` left as it is). A symbolic link at
    ``target`` is the folder it points to.
    """
    target = Path(os.path.realpath(target))
    if not overwrite:
        conflicts = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)
        try:
            if target.is_dir() and not any(target.iterdir()):
                os.rmdir(target)
            os.rename(tmp, target)
        except OSError as exc:
            if exc.errno not in conflicts and not isinstance(exc, FileExistsError):
                raise
            raise OutputConflictError(
                f"refusing to replace {str(target)!r}: it was created or filled while the checkpoint was being "
                f"written ({_describe_entries(target)})"
            ) from None
        return
    old: Path | None = None
    try:
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.osscar-old-", dir=target.parent))
            os.replace(target, old / "previous")
        os.replace(tmp, target)
    except BaseException:
        if old is not None and (old / "previous").exists() and not target.exists():
            os.replace(old / "previous", target)  # put the previous folder back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _describe_entries(target: Path) -> str:
    if not target.is_dir():
        return "a file" if target.exists() else "something that is gone again"
    entries = sorted(p.name for p in target.iterdir())
    return f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}"


def save_pruned(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    format: str = "auto",
    overwrite: bool = False,
    **save_kwargs: Any,
) -> Path:
    """Save a pruned model (and its tokenizer) as a checkpoint that ``from_pretrained`` loads; return its folder.

    ``format``:
        ``"auto"`` (default): a stock checkpoint when every block has the shape the stock config declares
        (vanilla transformers loads it, no osscar_hf needed), else the osscar format.
        ``"stock"``: a stock checkpoint, or ``SaveError`` saying why the stock config cannot express the shapes.
        ``"osscar"``: ``config.json`` carries ``quantization_config`` (``quant_method: "osscar"``, the
        pruning settings, per-block shapes, library versions); loading needs ``import osscar_hf``.
        ``"remote_code"``: ``configuration_osscar.py`` and ``modeling_osscar.py`` (torch and transformers
        only) are written beside the weights, and ``config.json`` gets ``model_type: "osscar_<family>"``, an
        ``auto_map`` naming their classes and the per-block shapes as plain fields (see
        :mod:`osscar_hf.io.remote_code`): ``from_pretrained(folder, trust_remote_code=True)`` loads it without
        osscar_hf, and stock transformers without ``trust_remote_code=True`` refuses it. Works for any model of
        a supported family, pruned by osscar_hf or not, whatever its shapes.

    Weights are written as safetensors only. The folder must not be the one the dense model was loaded from;
    an existing non-empty folder is refused unless ``overwrite=True``, which replaces it as a whole. The
    checkpoint is written to a hidden temporary folder beside the target and renamed into place.
    ``save_kwargs`` go to ``save_pretrained`` (for example ``max_shard_size``).
    """
    if "push_to_hub" in save_kwargs:
        raise SaveError("save_pruned does not push: save, then upload the folder (see osscar_hf.hub)")
    target = output_path(save_directory)
    check_not_dense_source(model, target)
    fmt = resolve_format(model, format)
    check_output_folder(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0o700 would become the checkpoint folder's mode; mkdir gives the usual umask mode.
    tmp = target.parent / f".{target.name}.osscar-tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        type(model).save_pretrained(model, tmp, **save_kwargs)
        rewrite_config(tmp, model, fmt)
        write_model_card(model, tmp, fmt)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        unsafe = sorted(p.name for p in tmp.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        if unsafe:  # pragma: no cover - transformers 5 writes safetensors only
            raise SaveError(f"save_pretrained wrote non-safetensors weight files {unsafe}")
        fsync_tree(tmp)
        try:
            move_into_place(tmp, target, overwrite=overwrite)
        except OutputConflictError as exc:
            raise OutputConflictError(f"{exc}; move it away (or pass overwrite=True) and save again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved the pruned model to %s (%s format)", target, fmt)
    return target
