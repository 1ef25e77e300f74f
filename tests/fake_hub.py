"""A loopback fake of the Hugging Face Hub, enough for ``huggingface_hub`` uploads and downloads.

No maintained fake Hub server exists, so the tests bring their own: a real HTTP server (``http.server``,
one thread per connection) bound to ``127.0.0.1`` on a free port, holding repositories in memory. It
answers the endpoints that ``HfApi.create_repo``/``create_commit``/``upload_folder``/``model_info``/
``list_repo_tree`` and ``hf_hub_download`` (hence ``from_pretrained``) call:

    POST /api/repos/create                          create a model repo (403 outside the token's namespace)
    GET  /api/whoami-v2                             the token's user
    POST /api/validate-yaml                         parse a README's YAML front matter
    POST /api/models/{repo}/preupload/{rev}         every file is uploaded in the commit ("regular")
    POST /api/models/{repo}/commit/{rev}            NDJSON: header, base64 files, deletions
    GET  /api/models/{repo}[/revision/{rev}]        repo info with sha and siblings (``?blobs=true``: with
                                                    their size and blobId, as ``model_info(files_metadata=True)``)
    GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing
    HEAD/GET /{repo}/resolve/{rev}/{path}           file content, with X-Repo-Commit and ETag; a GET honours a
                                                    ``Range: bytes=A-B`` header (206, as the Hub's CDN does)

Errors look like the Hub's: 401 ``Invalid credentials in Authorization header`` for a bad token on a
write, 403 for a namespace the token does not own, 404 with ``X-Error-Code`` ``RepoNotFound``,
``RevisionNotFound`` or ``EntryNotFound``; the files of a gated repo (``add_repo(..., gated=True)``) answer
401 (no token) or 403 (a user not in ``approved``) with ``X-Error-Code: GatedRepo``, while its repo info
stays readable. LFS and Xet transfers are never offered, so no blob store is needed: every file is a
regular git blob whose ETag is its git object id. Requests the server does not know are answered 404 and
recorded in ``unhandled`` so a test can show what a new client version started calling; ``downloads``
records every ``(repo, path)`` whose whole content a GET returned (ranged GETs are not counted).

    with FakeHub(tokens={"hf_alice": "alice"}) as hub:
        hub.url            # "http://127.0.0.1:PORT": give it to the client as HF_ENDPOINT
        hub.files("alice/model")   # {path: bytes} at the head of main
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["FakeHub"]

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Repo:
    owner: str
    private: bool = False
    gated: bool = False
    approved: set[str] = field(default_factory=set)  # users granted access to a gated repo
    # commit sha -> {path: bytes}; ``branches`` maps names ("main") to commit shas.
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """An in-memory Hub served on ``127.0.0.1``; use as a context manager or call ``start``/``stop``.

    ``tokens`` maps bearer tokens to user names. A token may write to repos of its own user's namespace
    only; reads of public repos need no token.
    """

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens = dict(tokens or {})
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.downloads: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._connections: set[Any] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop the open (keep-alive) connections, as a server that goes away does. The repos
        are kept: ``start`` serves them again, on a new port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self._lock:
                connections, self._connections = list(self._connections), set()
            for connection in connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake Hub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ state helpers for tests
    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, *, private: bool = False,
                 gated: bool = False, approved: set[str] | None = None) -> str:
        """Create ``repo_id`` (owned by its namespace; ``private``, ``gated`` and ``approved`` apply then) with
        an initial commit of ``files``, or commit ``files`` as the new head of ``main`` when it exists; return
        the commit sha."""
        with self._lock:
            if repo_id not in self.repos:
                self.repos[repo_id] = _Repo(owner=repo_id.split("/")[0], private=private, gated=gated,
                                            approved=set(approved or ()))
            return self._commit(self.repos[repo_id], dict(files or {}), "initial commit")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            repo = self.repos[repo_id]
            return dict(repo.snapshots[self._resolve_rev(repo, revision)])

    def commits(self, repo_id: str) -> list[str]:
        with self._lock:
            return list(self.repos[repo_id].messages)

    # ------------------------------------------------------------------ internals (call with the lock held)
    def _commit(self, repo: _Repo, files: dict[str, bytes], message: str, branch: str = "main") -> str:
        seed = f"{len(repo.snapshots)}:{message}:{time.time_ns()}".encode()
        sha = hashlib.sha1(seed + b"".join(sorted(git_blob_sha1(v).encode() for v in files.values()))).hexdigest()
        repo.snapshots[sha] = files
        repo.branches[branch] = sha
        repo.messages.append(message)
        return sha

    @staticmethod
    def _resolve_rev(repo: _Repo, rev: str) -> str:
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.snapshots:
            return rev
        raise _HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _user(self, headers: Any, *, required: bool) -> str | None:
        auth = headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        if token is not None and token not in self.tokens:
            raise _HTTPError(401, "Invalid credentials in Authorization header")
        if token is None and required:
            raise _HTTPError(401, "Invalid credentials in Authorization header")
        return self.tokens.get(token) if token else None

    def _readable(self, repo_id: str, headers: Any) -> _Repo:
        user = self._user(headers, required=False)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise _HTTPError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _downloadable(self, repo_id: str, headers: Any) -> _Repo:
        """A repo whose files the caller may download (gated repos: the owner and approved users only)."""
        repo = self._readable(repo_id, headers)
        if repo.gated:
            user = self._user(headers, required=False)
            if user is None:
                raise _HTTPError(401, f"Access to model {repo_id} is restricted. You must have access to it and be "
                                      "authenticated to access it. Please log in.", "GatedRepo")
            if user != repo.owner and user not in repo.approved:
                raise _HTTPError(403, f"Access to model {repo_id} is restricted and you are not in the authorized "
                                      f"list. Visit {self.url}/{repo_id} to ask for access.", "GatedRepo")
        return repo

    def _writable(self, repo_id: str, headers: Any) -> _Repo:
        user = self._user(headers, required=True)
        repo = self._readable(repo_id, headers)
        if user != repo.owner:
            raise _HTTPError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # ------------------------------------------------------------------ endpoints
    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes):
        """Return ``(status, headers, body)``; ``body`` is bytes or a JSON-serialisable object."""
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", self._preupload),
            ("POST", rf"/api/models/{_REPO}/commit/{_REV}", self._commit_endpoint),
            ("GET", rf"/api/models/{_REPO}(?:/revision/{_REV})?", self._model_info),
            ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?", self._tree),
            ("HEAD", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", self._resolve),
            ("GET", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", self._resolve),
        ]
        with self._lock:
            self.requests.append((method, path))
            for verb, pattern, handler in routes:
                match = re.fullmatch(pattern, path)
                if verb == method and match:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    try:
                        return handler(headers=headers, query=query, body=body, method=method, **args)
                    except _HTTPError as err:
                        extra = {"X-Error-Message": err.message}
                        if err.code:
                            extra["X-Error-Code"] = err.code
                        return err.status, extra, {"error": err.message}
            self.unhandled.append((method, path))
            return 404, {}, {"error": f"fake Hub: no route for {method} {path}"}

    def _create_repo(self, *, headers, body, **_):
        user = self._user(headers, required=True)
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") != "model":
            raise _HTTPError(400, "the fake Hub only holds model repos")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != user:
            raise _HTTPError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        if repo_id in self.repos:
            raise _HTTPError(409, "You already created this model repo")
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        repo = self.repos[repo_id] = _Repo(owner=user, private=private)
        self._commit(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial commit")
        return 200, {}, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def _whoami(self, *, headers, **_):
        user = self._user(headers, required=True)
        return 200, {}, {"type": "user", "name": user, "orgs": [], "auth": {"type": "access_token",
                                                                               "accessToken": {"role": "write"}}}

    def _validate_yaml(self, *, body, **_):
        content = json.loads(body).get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        if match is None:
            return 200, {}, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]}
        try:
            data = yaml.safe_load(match.group(1))
        except yaml.YAMLError as exc:
            return 400, {}, {"errors": [{"message": f"invalid YAML: {exc}"}], "warnings": []}
        if data is not None and not isinstance(data, dict):
            return 400, {}, {"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []}
        return 200, {}, {"errors": [], "warnings": []}

    def _preupload(self, *, repo, rev, headers, body, **_):
        repository = self._writable(repo, headers)
        current = repository.snapshots[self._resolve_rev(repository, rev)]
        files = json.loads(body)["files"]
        answer = []
        for entry in files:
            path = entry["path"]
            oid = git_blob_sha1(current[path]) if path in current else None
            answer.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return 200, {}, {"files": answer}

    def _commit_endpoint(self, *, repo, rev, headers, body, **_):
        repository = self._writable(repo, headers)
        if rev not in repository.branches:
            raise _HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        files = dict(repository.snapshots[repository.branches[rev]])
        summary = "commit"
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary") or summary
                parent = value.get("parentCommit")
                if parent is not None and parent != repository.branches[rev]:
                    raise _HTTPError(412, "parentCommit is not the head of the branch")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _HTTPError(400, "only base64 file contents are supported")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise _HTTPError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for name in [n for n in files if n.startswith(prefix)]:
                    del files[name]
            else:
                raise _HTTPError(400, f"the fake Hub does not support {key!r} operations (no LFS or Xet)")
        sha = self._commit(repository, files, summary, branch=rev)
        return 200, {}, {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": None, "success": True}

    def _model_info(self, *, repo, headers, query, rev="main", **_):
        repository = self._readable(repo, headers)
        sha = self._resolve_rev(repository, rev)
        files = repository.snapshots[sha]
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = [{"rfilename": name, "size": len(files[name]), "blobId": git_blob_sha1(files[name])} if blobs
                    else {"rfilename": name} for name in sorted(files)]
        return 200, {}, {
            "_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
            "author": repository.owner, "sha": sha, "private": repository.private,
            "gated": "manual" if repository.gated else False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": [], "library_name": "transformers",
            "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z",
            "siblings": siblings,
        }

    def _tree(self, *, repo, rev, headers, query, path="", **_):
        repository = self._readable(repo, headers)
        files = repository.snapshots[self._resolve_rev(repository, rev)]
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(name.startswith(prefix) for name in files):
            raise _HTTPError(404, f"{path} does not exist", "EntryNotFound")
        entries: dict[str, dict] = {}
        for name in sorted(files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": git_blob_sha1(folder.encode()),
                                                "size": 0, "path": folder})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[name] = {"type": "file", "oid": git_blob_sha1(files[name]), "size": len(files[name]),
                                 "path": name}
        return 200, {}, list(entries.values())

    def _resolve(self, *, repo, rev, path, headers, method, **_):
        repository = self._downloadable(repo, headers)
        sha = self._resolve_rev(repository, rev)
        files = repository.snapshots[sha]
        if path not in files:
            err = _HTTPError(404, "Entry not found", "EntryNotFound")
            raise err
        data = files[path]
        extra = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Content-Type": "application/octet-stream",
                 "Accept-Ranges": "bytes"}
        wanted = headers.get("Range") if method == "GET" else None
        if wanted is None:
            if method == "GET":
                self.downloads.append((repo, path))
            return 200, extra, data
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
        if match is None or not any(match.groups()):
            raise _HTTPError(416, f"unsupported Range header {wanted!r}")
        first, last = match.groups()
        if first == "":  # the last N bytes
            start, stop = max(len(data) - int(last), 0), len(data) - 1
        else:
            start, stop = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        if start >= len(data) or start > stop:
            return 416, {**extra, "Content-Range": f"bytes */{len(data)}"}, b""
        return 206, {**extra, "Content-Range": f"bytes {start}-{stop}/{len(data)}"}, data[start:stop + 1]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.fake._lock:
            self.fake._connections.discard(self.connection)
        super().finish()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        body = self._read_body()
        status, headers, payload = self.fake.handle(self.command, parts.path, parse_qs(parts.query),
                                                    self.headers, body)
        if isinstance(payload, bytes):
            data = payload
        else:
            data = json.dumps(payload).encode()
            headers = {"Content-Type": "application/json", **headers}
        self.send_response(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else None)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _dispatch
