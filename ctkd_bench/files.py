"""Files that other processes may read while we write them: atomic writes, temp clean-up, run locks.

Every file ctkd-bench writes for later reading (records, samples, checkpoints, caches of the vocabulary
maps and of the data) goes through :func:`atomic_write`: a temp file beside the target, then
``os.replace``, so a reader never sees half a file and a kill leaves the previous version intact. The
temp file is named ``.<target name>.<random>.tmp``; :func:`remove_stale_temps` deletes those of a
target whose writer is gone (the caller holds the target's :class:`RunLock`, so no live writer exists).

:class:`RunLock` makes one run one process: an exclusive ``flock`` on ``.<record stem>.lock`` beside
the record, holding the host and pid of its owner. The kernel drops the lock when its process dies,
so a lock file left by a killed run is taken over (and said so); a live owner is reported as
``running elsewhere: pid N on HOST``. ``flock`` works across the nodes of a cluster on shared file
systems that support it (Linux NFS emulates it with POSIX byte-range locks).
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def atomic_temp(path: Path) -> tuple[int, str]:
    """A temp file beside ``path`` (for a later ``os.replace``) with the mode a plain ``open`` would give.

    ``mkstemp`` creates files readable by their owner only; records, checkpoints and caches shared with
    collaborators or cluster jobs must get the usual permissions (``0o666`` minus the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    os.fchmod(fd, default_mode())
    return fd, tmp


def default_mode() -> int:
    """The mode a plain ``open`` gives a new file: ``0o666`` minus the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)``, then move the temp file over ``path``; on any error the temp is removed.

    The file gets :func:`default_mode` even when ``write`` recreates it (``safetensors`` writes files
    readable by their owner only)."""
    fd, tmp = atomic_temp(Path(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_lines_atomic(path: Path, lines: Iterable[str]) -> None:
    """Write text lines atomically (see :func:`atomic_write`), flushed to disk before the rename."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)


def write_text_atomic(path: Path, text: str) -> None:
    """Write text through a temp file in the same folder and ``os.replace``: never a half-written file."""
    write_lines_atomic(path, [text])


def torch_save_atomic(path: Path, obj: Any) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def stale_temps(path: Path) -> list[Path]:
    """The temp files that writers of ``path`` left behind (``.<name>.*.tmp`` beside it)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{glob.escape(path.name)}*.tmp") if p.is_file())


def remove_stale_temps(path: Path) -> tuple[int, int]:
    """Delete the temp files of ``path``'s dead writers; returns (files, bytes) removed.

    Call it only while holding the lock that every writer of ``path`` holds (a run's :class:`RunLock`
    for its record and checkpoint), so that no live writer's temp file is touched.
    """
    count = size = 0
    for temp in stale_temps(path):
        try:
            size += temp.stat().st_size
            temp.unlink()
            count += 1
        except FileNotFoundError:
            continue
    return count, size


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a lock."""

    host: str
    pid: int
    since: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def _read_holder(fd: int) -> LockHolder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 4096):
        raw += chunk
    try:
        data = json.loads(raw.decode("utf-8"))
        return LockHolder(str(data["host"]), int(data["pid"]), str(data.get("since", "")))
    except (ValueError, KeyError, TypeError):
        return None


class RunLock:
    """An exclusive lock on one run (``.<record stem>.lock`` beside its record); see the module docstring.

    ``acquire()`` returns ``None`` when this process now holds the lock, else the live holder. After a
    successful acquire, :attr:`taken_over` is the holder of a lock file whose process is gone (the run it
    left is resumed from its checkpoint), or ``None``.
    """

    def __init__(self, record_path: Path) -> None:
        record_path = Path(record_path)
        self.path = record_path.with_name("." + record_path.stem + ".lock")
        self._fd: int | None = None
        self.taken_over: LockHolder | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> LockHolder | None:
        if self._fd is not None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                return holder or LockHolder("an unknown host", -1, "")
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous owner removed this file between our open and our lock: retry
        previous = _read_holder(fd)
        self.taken_over = previous if previous is not None and previous.pid != os.getpid() else None
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode("utf-8"))
        os.fsync(fd)
        self._fd = fd
        return None

    def release(self) -> None:
        """Remove the lock file and drop the lock (in this order, so no one locks a removed file)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
