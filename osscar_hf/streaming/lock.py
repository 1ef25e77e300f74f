"""One streaming run per output folder: an exclusive ``fcntl.flock`` on a lock file beside it."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from ..errors import ConcurrentRunError
from .resume import partial_folder

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def lock_file(target: Path) -> Path:
    """The lock file that :func:`prune_checkpoint` holds, beside ``target``, while it writes the checkpoint for it."""
    return target.parent / f".{target.name}.osscar-lock"


def _lock_details(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 65536).decode("utf-8"))
        return (f"pid {data['pid']} on {data['host']}, started {data['started']}, pruning {data['source']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "its details are not recorded yet"


@contextlib.contextmanager
def run_lock(target: Path, source: str) -> Iterator[Path]:
    """Hold the exclusive lock of the output folder ``target`` (``fcntl.flock`` on :func:`lock_file`), or raise
    :class:`ConcurrentRunError` at once when another process holds it.

    The lock file records the holder's pid, host, start time and source. The lock dies with its process, so a lock
    file left by a run that was killed does not block (its contents are replaced); on exit, also by an exception,
    the file is removed and the lock released. Where ``fcntl`` does not exist (Windows) runs are not locked.
    """
    path = lock_file(target)
    if fcntl is None:  # pragma: no cover - not POSIX
        logger.warning("cannot lock %s on this platform: do not run two prunes into %s at once", path, target)
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = -1
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            details = _lock_details(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise ConcurrentRunError(
                f"another prune_checkpoint run is writing to {target} ({details}): it holds the lock {path}. Two runs "
                f"into one output folder would corrupt its partial folder {partial_folder(target)}; wait for that "
                "run to finish, or stop it, then run again (an interrupted run resumes)"
            ) from None
        # A run that finished may have removed the file between our open and our lock: lock the file that is there.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:  # pragma: no cover - the lock file kept being replaced
        raise ConcurrentRunError(f"could not take the lock {path}: it keeps being replaced by other runs")
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now(UTC).isoformat(timespec="seconds"), "source": source}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        yield path
    finally:
        try:
            os.unlink(path)  # still ours: we hold the lock
        except FileNotFoundError:
            pass
        os.close(fd)  # releases the lock


