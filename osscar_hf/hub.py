"""Push a pruned model and its card to the Hugging Face Hub.

    card = build_model_card(pruner.report, base_model=base_id, config=pruner.config, repo_id="me/model-osscar")
    push_pruned(model, "me/model-osscar", card=card, tokenizer=tokenizer)   # in-memory model
    push_pruned("pruned/", "me/model-osscar", card=card)                      # or a saved folder

Everything goes up in **one commit**: the weights, ``config.json``, ``generation_config.json``, the
tokenizer files when given, and the card as ``README.md``; a saved folder is uploaded with every file in
it, so a remote-code checkpoint (``save_pruned(..., format="remote_code")``) keeps its
``configuration_osscar.py`` and ``modeling_osscar.py``. ``PreTrainedModel.push_to_hub`` is not used
because it writes transformers' generic card over ours; an in-memory model is saved with
``save_pretrained`` into a temporary folder (what ``push_to_hub`` does too) and that folder is committed.
Weight files left on the branch by an earlier push (``*.safetensors``, ``*.bin`` and their shard
indexes) that the new upload does not contain are deleted in the same commit, so an old shard index can
never shadow the new weights.

Failures raise a :class:`HubPushError` that says what to do: :class:`HubAuthenticationError` (no token,
or a token the Hub rejects), :class:`HubPermissionError` (the repository belongs to someone else or the
token is read-only), :class:`HubConnectionError` (the Hub cannot be reached).
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from .errors import HubAuthenticationError, HubConnectionError, HubPermissionError, HubPushError

__all__ = [
    "HubAuthenticationError",
    "HubConnectionError",
    "HubPermissionError",
    "HubPushError",
    "push_pruned",
    "transport_errors",
]

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload model pruned with OSSCAR"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_SKIPPED_DIRS = (".git", ".cache", ".huggingface")
_TOKEN_HELP = (
    "pass a token (`token=...` in Python, `--token` on the command line), set the HF_TOKEN environment "
    "variable, or run `hf auth login`; the token needs write access (create one at "
    "https://huggingface.co/settings/tokens)"
)


def push_pruned(
    model_or_folder: Any,
    repo_id: str,
    *,
    card: ModelCard | str | None = None,
    tokenizer: Any = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    revision: str | None = None,
    endpoint: str | None = None,
) -> CommitInfo:
    """Push a pruned model (a ``PreTrainedModel`` or a folder written by ``save_pretrained``) to ``repo_id``.

    Args:
        model_or_folder: the pruned model, or the path of its saved folder (uploaded as is, except that
            ``card`` replaces its README.md).
        repo_id: ``"namespace/name"``; created if it does not exist (``private`` applies then only).
        card: the model card (from :func:`osscar_hf.card.build_model_card`, or Markdown text) written as
            README.md. Without it the folder's own README.md, if any, is uploaded.
        tokenizer: saved next to an in-memory model (for a folder, save it into the folder instead).
        token: a Hub token with write access; default the logged-in one (``HF_TOKEN`` or ``hf auth login``).
        private: visibility of a newly created repository.
        commit_message: the commit's summary.
        revision: the branch to commit to (default ``main``).
        endpoint: the Hub URL (default ``HF_ENDPOINT``, else https://huggingface.co).

    Returns:
        The ``huggingface_hub.CommitInfo`` of the commit (``.commit_url``, ``.oid``, ``.repo_url``).
    """
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubPushError(f"repo_id must be 'namespace/name' (e.g. 'your-user/model-osscar'), got {repo_id!r}")
    if not commit_message:
        raise HubPushError("commit_message must be a non-empty str")
    readme = _card_text(card)
    token = token or get_token()
    if not token:
        raise HubAuthenticationError(f"no Hugging Face token found to push to {repo_id}: {_TOKEN_HELP}")

    if isinstance(model_or_folder, (str, os.PathLike)):
        if tokenizer is not None:
            raise HubPushError("tokenizer= is for in-memory models; save the tokenizer into the folder instead")
        return _push_folder(Path(model_or_folder), repo_id, readme, token, private, commit_message, revision,
                            endpoint)
    if not hasattr(model_or_folder, "save_pretrained"):
        raise HubPushError(
            f"model_or_folder must be a PreTrainedModel or the path of a saved folder, got "
            f"{type(model_or_folder).__name__}"
        )
    with tempfile.TemporaryDirectory(prefix="osscar_push_") as tmp:
        model_or_folder.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if readme is None:
            logger.warning("pushing %s without a model card: pass card=build_model_card(...)", repo_id)
        return _push_folder(Path(tmp), repo_id, readme, token, private, commit_message, revision, endpoint)


# --------------------------------------------------------------------------- internals
def _card_text(card: ModelCard | str | None) -> str | None:
    if card is None:
        return None
    if isinstance(card, ModelCard):
        return str(card)
    if isinstance(card, str):
        return card
    raise HubPushError(f"card must be a huggingface_hub.ModelCard or Markdown text, got {type(card).__name__}")


def _folder_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise HubPushError(f"{str(folder)!r} is not a folder: pass a PreTrainedModel or a save_pretrained folder")
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part in _SKIPPED_DIRS for part in rel.parts[:-1]):
            files[rel.as_posix()] = path
    if "config.json" not in files:
        raise HubPushError(f"{str(folder)!r} has no config.json: is it a folder written by save_pretrained?")
    if not any(_is_weight(name) and not name.endswith(".json") for name in files):
        raise HubPushError(f"{str(folder)!r} has no weights (*.safetensors or *.bin): save the model into it first")
    return files


def _is_weight(name: str) -> bool:
    return any(fnmatch.fnmatch(name.rsplit("/", 1)[-1], pattern) for pattern in WEIGHT_PATTERNS)


def _push_folder(folder: Path, repo_id: str, readme: str | None, token: str, private: bool | None,
                 commit_message: str, revision: str | None, endpoint: str | None) -> CommitInfo:
    files = _folder_files(folder)
    operations: list[Any] = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        for name, path in files.items()
        if not (readme is not None and name == "README.md")
    ]
    if readme is not None:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode("utf-8")))
    uploaded = {op.path_in_repo for op in operations}

    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(api, repo_id):
        _ensure_repo(api, repo_id, private=private, token=token)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        remote = api.list_repo_files(repo_id, revision=revision, token=token)
        stale = [name for name in remote if _is_weight(name) and name not in uploaded]
        if stale:
            logger.info("deleting stale weight files from %s: %s", repo_id, stale)
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
        info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision, token=token)
    logger.info("pushed %d files to %s (%s)", len(uploaded), repo_id, info.commit_url)
    return info


def _ensure_repo(api: HfApi, repo_id: str, *, private: bool | None, token: str) -> None:
    """Create ``repo_id`` unless it exists.

    Not ``create_repo(exist_ok=True)``: its fallback for a repository in a namespace the token may not create
    in (403, yet the token may still write to that one repository) builds the URL from the global endpoint,
    not ``api.endpoint``, and fails for any other Hub. The same logic, here: on 409 the repository exists;
    on 401/403 go on if it exists (the commit then decides), else report the refusal.
    """
    try:
        api.create_repo(repo_id, private=private, token=token)
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status == 409:
            return
        if status in (401, 402, 403):
            try:
                api.repo_info(repo_id, token=token)
            except HfHubHTTPError:
                raise exc from None
            return
        raise


def transport_errors() -> tuple[type[BaseException], ...]:
    """Network-level exception types of the HTTP clients huggingface_hub may use (those installed here), for
    telling an unreachable Hub from a refusal (also used by :mod:`osscar_hf.streaming.sources`)."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            types.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(types)


@contextlib.contextmanager
def _hub_errors(api: HfApi, repo_id: str) -> Iterator[None]:
    """Turn huggingface_hub and HTTP client failures into HubPushErrors that say what to do."""
    try:
        yield
    except HubPushError:
        raise
    except OfflineModeIsEnabled as exc:
        raise HubConnectionError(
            f"cannot push to {repo_id}: huggingface_hub is in offline mode (HF_HUB_OFFLINE is set); unset "
            "HF_HUB_OFFLINE and retry"
        ) from exc
    except HfHubHTTPError as exc:
        raise _http_error(api, repo_id, exc) from exc
    except transport_errors() as exc:
        raise HubConnectionError(
            f"cannot reach the Hugging Face Hub at {api.endpoint} to push {repo_id} ({type(exc).__name__}: {exc}); "
            "check the network connection (and HF_ENDPOINT if you set it), then retry"
        ) from exc


def _http_error(api: HfApi, repo_id: str, exc: HfHubHTTPError) -> HubPushError:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    server = response.headers.get("X-Error-Message") if response is not None else None
    server = server or (str(exc).strip().splitlines() or ["no message"])[0]
    if status == 401:
        return HubAuthenticationError(
            f"the Hub at {api.endpoint} rejected the token while pushing {repo_id} (401: {server}): it is invalid "
            f"or expired; {_TOKEN_HELP}"
        )
    if status == 403:
        namespace, name = repo_id.split("/")
        user = _whoami(api)
        own = f"push to your own namespace (e.g. '{user}/{name}')" if user else "push to a namespace you own"
        return HubPermissionError(
            f"you may not write to {repo_id} (403: {server}): the repository or the namespace '{namespace}' belongs "
            f"to another user or organisation, or your token is read-only; {own}, get write rights to "
            f"'{namespace}', or use a token with write access"
        )
    return HubPushError(f"the Hub at {api.endpoint} refused the push to {repo_id} (HTTP {status}): {exc}")


def _whoami(api: HfApi) -> str | None:
    try:
        return api.whoami().get("name")
    except Exception:  # the user name only improves a message
        return None
