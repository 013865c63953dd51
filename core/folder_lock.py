"""One writer per folder: a lock file held with ``flock`` (a run folder while ``train`` writes it,
an index folder while ``index`` writes it).

The kernel drops an ``flock`` when its process dies, even by SIGKILL, so a lock file left by a
killed process is simply taken over; the file's JSON (pid, host, start time) only names the holder
in the error a second process gets. On release the file is removed (a finished folder keeps none).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .errors import UserError


class FolderBusyError(UserError, ValueError):
    """Another live process writes the folder."""


class FolderLock:
    """``path`` (a file inside the folder) locked for one ``process`` (``"train"``, ``"index"``).

    ``advice`` ends the error a second process gets; ``error`` is the exception type it raises.
    """

    def __init__(self, path: str | Path, process: str, advice: str, error: type[Exception] = FolderBusyError):
        self.path = Path(path)
        self.process, self.advice, self.error = process, advice, error
        self.fd: int | None = None

    def acquire(self) -> dict[str, Any]:
        """Take the lock or raise ``error`` naming the live holder; returns the previous (dead)
        holder's record, ``{}`` when there was none."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_holder(fd, wait=2.0)
                os.close(fd)
                raise self.error(f"{self.path.parent} is being written by another {self.process} process "
                                 f"({describe_holder(holder)}); {self.advice}") from None
            try:  # a holder that finished may have removed the file between our open and flock
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = read_holder(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return previous

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # still holding the lock: nobody can take the old file now
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_holder(fd: int, wait: float = 0.0) -> dict[str, Any]:
    """The JSON record in a lock file, ``{}`` when there is none.

    A holder takes the ``flock`` before it writes its record, so an empty or half-written file
    may simply be a record not written yet: wait up to ``wait`` s for it to appear.
    """
    deadline = time.monotonic() + wait
    while True:
        text = os.pread(fd, 65536, 0).decode(errors="replace")
        if text:
            try:
                record = json.loads(text)
                return record if isinstance(record, dict) else {}
            except ValueError:
                pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.05)


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "pid unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
