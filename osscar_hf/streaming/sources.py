"""Where a streamed checkpoint's files come from (a local folder or a Hub repository) and reading its
tensors by name: :class:`LocalFiles`, :class:`HubFiles`, :class:`ShardReader`, :func:`open_source`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import CheckpointError
from ..io.save import CONFIG_NAME

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
)


# --------------------------------------------------------------------------- where the source files come from
class LocalFiles:
    """The files of a checkpoint in a local folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def describe(self) -> str:
        return str(self.folder)

    def connect(self) -> None:
        """Nothing to look up for a folder (see :meth:`HubFiles.connect`)."""

    def config_folder(self) -> Path:
        """The folder holding ``config.json`` and the tokenizer files."""
        return self.folder

    def has(self, name: str) -> bool:
        return (self.folder / name).is_file()

    def listing(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir())

    def path(self, name: str) -> Path:
        return self.folder / name

    def display(self, name: str) -> str:
        return str(self.folder / name)

    def shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape in the safetensors file ``name`` (its header, checked against its size)."""
        path = self.folder / name
        if not path.is_file():
            raise CheckpointError(f"the shard {path} listed in {INDEX_NAME} does not exist")
        return ShardReader.tensor_shapes(path)

    def done_with(self, name: str) -> None:
        """A local file is the user's: it is never deleted."""

    def fingerprint(self, names: set[str]) -> dict[str, Any]:
        files = {}
        for name in sorted(names):
            stat = (self.folder / name).stat()
            files[name] = [stat.st_size, stat.st_mtime_ns]
        return {"source": os.path.realpath(self.folder), "source_files": files}

    def read_record(self, folder: Path) -> list[dict[str, str]]:
        return []

    def pending_deletions(self) -> list[str]:
        return []

    def keep_record(self, folder: Path, adopt: list[dict[str, str]]) -> None:
        pass


class _QuietTqdm(tqdm):
    """``tqdm_class`` for huggingface_hub downloads when ``progress=False``: tqdm with its bar disabled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


class HubFiles:
    """The files of a checkpoint in a Hub model repository, downloaded into the huggingface_hub cache only when
    first needed (``hf_hub_download``, pinned to the commit the revision resolved to when the run started).

    :meth:`connect` resolves the revision and lists the files with their sizes and blob ids
    (``model_info(files_metadata=True)``), then downloads ``config.json``, ``generation_config.json`` and the
    tokenizer files. Shard headers are read with HTTP range requests (or from the cache) without downloading
    the shards; a shard is downloaded when :meth:`path` is first asked for it, and a file already in the cache
    is not downloaded again. With ``delete_downloaded=True``, :meth:`done_with` deletes a weight file from the
    cache once its blocks are done, but only when this run (or the interrupted run it continues) downloaded it:
    files that were in the cache before are left alone.
    """

    RECORD_NAME = ".osscar_downloads.json"

    def __init__(self, repo_id: str, *, revision: str | None = None, token: str | bool | None = None,
                 cache_dir: str | os.PathLike | None = None, endpoint: str | None = None,
                 delete_downloaded: bool = False, progress: bool = True) -> None:
        from huggingface_hub import constants

        self.repo_id = repo_id
        self.revision = revision
        self.token = token
        self.cache_dir = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser().absolute()
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.delete_downloaded = delete_downloaded
        self.tqdm_class = None if progress else _QuietTqdm
        self.sha: str | None = None
        self.siblings: dict[str, Any] = {}
        self._paths: dict[str, Path] = {}
        self._headers: dict[str, dict[str, tuple[int, ...]]] = {}
        self._ours: dict[str, dict[str, str | None]] = {}  # file name -> {"pointer": ..., "blob": ... or None}
        self._record: Path | None = None

    def describe(self) -> str:
        at = f" at {self.revision}" if self.revision else ""
        return f"the Hub repository {self.repo_id}{at} ({self.endpoint})"

    # ------------------------------------------------------------------ look-ups
    def connect(self) -> None:
        """Resolve the revision to a commit, list the files and download config, tokenizer and generation config."""
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token)
        with self._errors("look up"):
            info = api.model_info(self.repo_id, revision=self.revision, files_metadata=True)
        if not info.sha:
            raise CheckpointError(f"the Hub at {self.endpoint} did not say which commit {self.repo_id} is at; pass "
                                  "revision= a commit sha")
        self.sha = info.sha
        self.siblings = {s.rfilename: s for s in info.siblings or []}
        logger.info("streaming %s from the Hub: revision %s is commit %s", self.repo_id, self.revision or "main",
                    self.sha)
        if not self.has(CONFIG_NAME):
            raise CheckpointError(
                f"{self.repo_id} (commit {self.sha}) has no {CONFIG_NAME}: is it a transformers model repository? "
                f"(files: {', '.join(self.listing()[:8]) or 'none'})")
        if not (self.has(INDEX_NAME) or self.has(SINGLE_NAME)):
            raise CheckpointError(
                f"{self.repo_id} (commit {self.sha}) has neither {INDEX_NAME} nor {SINGLE_NAME}: streaming needs "
                f"safetensors weights (files: {', '.join(self.listing()[:8]) or 'none'}); for other formats load the "
                "model with from_pretrained and prune it in memory, or save it with save_pretrained and stream the "
                "folder")
        for name in (CONFIG_NAME, GENERATION_CONFIG_NAME, *TOKENIZER_FILES):
            if self.has(name):
                self.path(name)

    def config_folder(self) -> Path:
        return self.path(CONFIG_NAME).parent

    def has(self, name: str) -> bool:
        return name in self.siblings

    def listing(self) -> list[str]:
        return sorted(self.siblings)

    def display(self, name: str) -> str:
        return f"{name} of {self.repo_id} (commit {self.sha})"

    def _cached(self, name: str) -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo_id, name, cache_dir=self.cache_dir, revision=self.sha)
        return Path(found) if isinstance(found, str) else None

    def _blobs(self) -> Path:
        from huggingface_hub.file_download import repo_folder_name

        return self.cache_dir / repo_folder_name(repo_id=self.repo_id, repo_type="model") / "blobs"

    def path(self, name: str) -> Path:
        """The local path of ``name`` at the pinned commit, downloaded into the cache when it is not there."""
        if name in self._paths:
            return self._paths[name]
        if not self.has(name):
            raise CheckpointError(f"{self.display(name)} does not exist: the repository lists "
                                  f"{', '.join(self.listing()[:8]) or 'no files'}")
        from huggingface_hub import hf_hub_download

        cached = self._cached(name)
        if cached is not None:
            self._paths[name] = cached
            return cached
        blobs = self._blobs()
        before = set(os.listdir(blobs)) if blobs.is_dir() else set()
        size = getattr(self.siblings[name], "size", None)
        logger.info("downloading %s%s", self.display(name), f" ({_human(size)})" if size else "")
        with self._errors(f"download {name} of"):
            local = Path(hf_hub_download(self.repo_id, name, revision=self.sha, cache_dir=self.cache_dir,
                                         token=self.token, endpoint=self.endpoint, tqdm_class=self.tqdm_class))
        blob = Path(os.path.realpath(local))
        created_blob = blob != local and blob.parent == blobs and blob.name not in before
        self._ours[name] = {"pointer": str(local), "blob": str(blob) if created_blob else None}
        self._save_record()
        if name in self._headers:  # the download must be the file whose header was checked
            got = ShardReader.tensor_shapes(local)
            if got != self._headers[name]:
                raise CheckpointError(
                    f"the downloaded {self.display(name)} ({local}) does not hold the tensors its header on the Hub "
                    "lists: delete it from the cache and run again")
        self._paths[name] = local
        return local

    def shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape in the safetensors file ``name``: from the cached file, else from its header on the
        Hub (an HTTP range request; the file is not downloaded)."""
        if name in self._headers:
            return self._headers[name]
        if not self.has(name):
            raise CheckpointError(f"the shard {name} listed in {INDEX_NAME} does not exist in {self.repo_id} "
                                  f"(commit {self.sha})")
        cached = self._paths.get(name) or self._cached(name)
        if cached is not None:
            shapes = ShardReader.tensor_shapes(cached)
        else:
            from huggingface_hub import HfApi
            from huggingface_hub.errors import SafetensorsParsingError

            api = HfApi(endpoint=self.endpoint, token=self.token)
            try:
                with self._errors(f"read the header of {name} in"):
                    meta = api.parse_safetensors_file_metadata(self.repo_id, name, revision=self.sha)
            except SafetensorsParsingError as exc:
                raise CheckpointError(f"{self.display(name)} is not a valid safetensors file: {exc}") from None
            shapes = {key: tuple(info.shape) for key, info in meta.tensors.items()}
        self._headers[name] = shapes
        return shapes

    def fingerprint(self, names: set[str]) -> dict[str, Any]:
        files = {}
        for name in sorted(names):
            sibling = self.siblings[name]
            lfs = getattr(sibling, "lfs", None)
            files[name] = [sibling.size, getattr(lfs, "sha256", None) or sibling.blob_id]
        return {"source": {"hub": self.repo_id, "commit": self.sha}, "source_files": files}

    # ------------------------------------------------------------------ deleting what this run downloaded
    def read_record(self, folder: Path) -> list[dict[str, str]]:
        """The downloads an interrupted run into the partial folder ``folder`` recorded."""
        try:
            data = json.loads((folder / self.RECORD_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        if not isinstance(data, dict) or data.get("repo") != self.repo_id or data.get("commit") != self.sha:
            return []
        return [e for e in data.get("files", []) if isinstance(e, dict)]

    def keep_record(self, folder: Path, adopt: list[dict[str, Any]]) -> None:
        """From now on record this run's downloads in ``folder``; take over those of the run it continues
        (files it downloaded that are still in the cache, as it left them)."""
        prefix = str(self.cache_dir) + os.sep
        for entry in adopt:
            name, pointer, blob = entry.get("name"), entry.get("pointer"), entry.get("blob")
            if not (isinstance(name, str) and isinstance(pointer, str) and pointer.startswith(prefix)):
                continue
            if name in self._ours or not os.path.lexists(pointer):
                continue
            if blob is not None and os.path.realpath(pointer) != blob:
                continue
            self._ours[name] = {"pointer": pointer, "blob": blob}
        self._record = folder / self.RECORD_NAME
        self._save_record()

    def pending_deletions(self) -> list[str]:
        """The files this run downloaded and will delete when it no longer needs them."""
        return sorted(self._ours) if self.delete_downloaded else []

    def _save_record(self) -> None:
        if not self.delete_downloaded or self._record is None or not self._record.parent.is_dir():
            return
        tmp = self._record.with_name(self._record.name + ".tmp")
        tmp.write_text(json.dumps({"repo": self.repo_id, "commit": self.sha,
                                   "files": [{"name": k, **v} for k, v in sorted(self._ours.items())]}),
                       encoding="utf-8")
        os.replace(tmp, self._record)

    def done_with(self, name: str) -> None:
        """The run needs ``name`` no more: with ``delete_downloaded``, delete it from the cache if this run (or the
        run it continues) downloaded it."""
        if not self.delete_downloaded or name not in self._ours:
            return
        entry = self._ours.pop(name)
        for path in (entry["pointer"], entry["blob"]):
            if path is not None:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        self._paths.pop(name, None)
        logger.info("deleted %s from the cache (downloaded by this run, no longer needed)", self.display(name))
        self._save_record()

    # ------------------------------------------------------------------ errors
    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn huggingface_hub and network failures into CheckpointErrors that say what to do."""
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        from ..hub import transport_errors

        repo = self.repo_id
        login = ("pass a token (`token=...` in Python, `--token` on the command line), set HF_TOKEN or run "
                 "`hf auth login`")
        local = (f"or download it first (`hf download {repo}`, or huggingface_hub.snapshot_download) and pass the "
                 "folder")
        try:
            yield
        except CheckpointError:
            raise
        except OfflineModeIsEnabled:
            raise CheckpointError(
                f"cannot {action} {repo}: huggingface_hub is in offline mode (HF_HUB_OFFLINE is set). Unset it, {local}"
                " (huggingface_hub.snapshot_download(repo_id, local_files_only=True) returns a cached copy's folder)"
            ) from None
        except GatedRepoError:
            raise CheckpointError(
                f"{repo} is a gated repository and this account has no access to it: accept its conditions at "
                f"{self.endpoint}/{repo}, then {login} with a token of that account") from None
        except RepositoryNotFoundError:
            raise CheckpointError(
                f"no model repository {repo!r} on {self.endpoint} (and no local folder of that name): check the id "
                f"('namespace/name'); for a private or gated repository {login}") from None
        except RevisionNotFoundError:
            raise CheckpointError(
                f"{repo} has no revision {self.revision!r}: pass revision= a branch, tag or commit sha that exists"
            ) from None
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            first = (str(exc).strip().splitlines() or ["no message"])[0]
            if status == 401:
                raise CheckpointError(f"the Hub at {self.endpoint} rejected the token while trying to {action} {repo}"
                                      f" (401): it is invalid or expired; {login} with a valid one") from None
            if status == 403:
                raise CheckpointError(f"the Hub at {self.endpoint} refused access to {repo} (403: {first}); {login} "
                                      "with a token that may read it") from None
            raise CheckpointError(
                f"the Hub at {self.endpoint} answered HTTP {status} when trying to {action} {repo} ({first}); run again "
                f"later (finished blocks are kept), {local}") from None
        except (LocalEntryNotFoundError, *transport_errors()) as exc:
            cause = exc.__cause__ or exc
            raise CheckpointError(
                f"cannot reach the Hugging Face Hub at {self.endpoint} to {action} {repo} ({type(cause).__name__}: "
                f"{_first_line(cause)}): check the network connection (and HF_ENDPOINT if you set it) and run again "
                f"(an interrupted run resumes where it stopped), {local}") from None
        except OSError as exc:  # a failed consistency check, a full disk, ...
            raise CheckpointError(
                f"could not {action} {repo} into the cache {self.cache_dir} ({type(exc).__name__}: {_first_line(exc)});"
                " fix the cause (free disk space?) and run again") from None


def _human(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


# --------------------------------------------------------------------------- reading the source checkpoint
class ShardReader:
    """The tensors of a safetensors checkpoint (sharded with an index, or a single file), read by name.

    ``files`` says where the files are: a local folder (a path, or :class:`LocalFiles`) or a Hub repository
    (:class:`HubFiles`, which downloads a shard when it is first read). With ``dtype``, floating-point tensors
    are read in that dtype (as ``from_pretrained(..., dtype=)`` loads them); by default in the file's own.
    """

    def __init__(self, files: LocalFiles | HubFiles | str | os.PathLike,
                 weight_map: dict[str, str] | None = None, *, dtype: torch.dtype | None = None) -> None:
        if isinstance(files, (str, os.PathLike)):
            files = LocalFiles(Path(files))
        self.source = files
        self.dtype = dtype
        if weight_map is not None:
            self.weight_map = dict(weight_map)
        elif files.has(INDEX_NAME):
            index = files.path(INDEX_NAME)
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
                weight_map = data["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{files.display(INDEX_NAME)} is not a valid safetensors index ({exc})") from None
            self.weight_map: dict[str, str] = {str(k): str(v) for k, v in weight_map.items()}
        elif files.has(SINGLE_NAME):
            self.weight_map = {name: SINGLE_NAME for name in files.shapes(SINGLE_NAME)}
        else:
            present = files.listing()
            raise CheckpointError(
                f"{files.describe()} has neither {INDEX_NAME} nor {SINGLE_NAME}: streaming needs safetensors weights "
                f"(found {', '.join(present[:8]) or 'nothing'}); convert other formats by loading the model and "
                "saving it with save_pretrained"
            )
        self.stored_names: dict[str, str] = {}  # model name -> name in the checkpoint, where they differ (rename)
        # Every header is read (and, for local files, checked against the file size) before any work starts.
        self.shapes: dict[str, tuple[int, ...]] = {}
        names = sorted(set(self.weight_map.values()))
        headers = _map_threads(files.shapes, names) if isinstance(files, HubFiles) else map(files.shapes, names)
        for name, shapes in zip(names, headers):
            for key, shard in self.weight_map.items():
                if shard == name:
                    if key not in shapes:
                        raise CheckpointError(
                            f"{INDEX_NAME} puts {key!r} in {files.display(name)}, which does not hold it")
                    self.shapes[key] = shapes[key]

    def rename(self, model_name: Callable[[str], str]) -> None:
        """Name every tensor by ``model_name`` of its name in the checkpoint (a family whose checkpoints name a
        tensor unlike its model: :meth:`osscar_hf.arch.ArchSpec.model_name`); reading still uses the stored name."""
        renamed = {model_name(key): key for key in self.weight_map}
        if len(renamed) != len(self.weight_map):
            raise CheckpointError(f"{self.source.describe()} holds a tensor under both its checkpoint and its model "
                                  "name; keep one")
        self.stored_names = {new: old for new, old in renamed.items() if new != old}
        self.weight_map = {new: self.weight_map[old] for new, old in renamed.items()}
        self.shapes = {new: self.shapes[old] for new, old in renamed.items()}

    @staticmethod
    def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor in the safetensors file ``path``, read from its header (no tensor is loaded).

        Raises :class:`CheckpointError` naming the file when it cannot be read (truncated or corrupt).
        """
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(
                f"cannot read the safetensors file {path}: {exc} (is it truncated or corrupt?)") from None

    @staticmethod
    def _keys(path: Path) -> list[str]:
        return list(ShardReader.tensor_shapes(path))

    def files(self, names: list[str]) -> list[str]:
        """How the files holding the tensors ``names`` are named in messages."""
        return sorted({self.source.display(self.weight_map[name]) for name in names})

    def shards(self, names: list[str]) -> set[str]:
        return {self.weight_map[name] for name in names}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, opening each shard once (a Hub shard is downloaded when first read), as tensors
        with their own memory (no view of a memory-mapped file survives the call)."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for shard, keys in by_shard.items():
            path = self.source.path(shard)
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in keys:
                        # A copy in ordinary memory: the tensor safetensors returns lives in the file's memory
                        # map, and any reference to it that outlives this block (even to a 5 KB bias) would keep
                        # the pages of the whole shard resident.
                        tensor = handle.get_tensor(self.stored_names.get(key, key))
                        cast = self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype
                        tensors[key] = tensor.to(self.dtype) if cast else tensor.clone()
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"cannot read {keys[0]!r} from the safetensors file {path}: {exc}") from None
        return tensors


def _map_threads(function: Any, items: list[str], workers: int = 8) -> list[Any]:
    """``[function(x) for x in items]`` on a few threads (for network-bound look-ups)."""
    if len(items) <= 1:
        return [function(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(function, items))


def _looks_like_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith(("/", ".", "~")) or "\\" in name or (os.sep != "/" and os.sep in name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def open_source(model_path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
                cache_dir: str | os.PathLike | None = None, endpoint: str | None = None,
                delete_downloaded_shards: bool = False, progress: bool = True) -> LocalFiles | HubFiles:
    """Where ``prune_checkpoint`` reads ``model_path`` from: a local folder, else a Hub model id (nothing is
    downloaded yet)."""
    path = Path(model_path).expanduser() if isinstance(model_path, (str, os.PathLike)) else None
    if path is not None and path.exists() and not path.is_dir():
        raise CheckpointError(f"{os.fspath(model_path)!r} is a file: pass the folder of the checkpoint (the one "
                              f"holding {CONFIG_NAME} and the safetensors weights), or a Hub model id")
    if path is not None and path.is_dir():
        if revision is not None:
            raise CheckpointError(f"revision={revision!r} applies to Hub model ids, but {os.fspath(model_path)!r} is a "
                                  "local folder: leave revision out")
        if delete_downloaded_shards:
            logger.info("delete_downloaded_shards applies to Hub downloads only: nothing in %s is deleted", path)
        return LocalFiles(path.absolute())
    if isinstance(model_path, str) and _looks_like_repo_id(model_path):
        return HubFiles(model_path, revision=revision, token=token, cache_dir=cache_dir, endpoint=endpoint,
                        delete_downloaded=delete_downloaded_shards, progress=progress)
    raise CheckpointError(
        f"{os.fspath(model_path) if path is not None else model_path!r} is neither a local checkpoint folder nor a "
        "Hub model id: pass the folder of a safetensors checkpoint, or a Hub id such as 'namespace/name'")


