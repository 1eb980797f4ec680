"""One writer per run folder: an exclusive lock that a second ``cppo fit`` on the same folder cannot take.

Two ``cppo fit --ckpt_path last`` started at once resolve to the same run folder: without a lock they log
every step twice into one ``metrics.csv``, write ``step=6.ckpt`` and ``step=6-v1.ckpt``, and leave the
``last.ckpt`` of whichever finished last. The lock is an ``flock`` on ``<run>/.cppo.lock``: the operating
system releases it when the process ends in any way (``kill -9`` included), so a crashed run never leaves
a stale lock behind; the file itself names the holder for the message.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock (and no message)
    fcntl = None

LOCK_NAME = ".cppo.lock"


class RunFolderInUse(SystemExit):
    """Another process holds the run folder's lock (exits with status 1 and the message)."""


class RunLock:
    """An exclusive, non-blocking lock on a run folder, held from :meth:`acquire` to :meth:`release`.

    Args:
        folder: the run folder (created if missing).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._handle = None

    def acquire(self) -> RunLock:
        """Take the lock.

        Raises:
            RunFolderInUse: another process holds it (the message names the folder and the holder).
        """
        if fcntl is None or self._handle is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderInUse(
                f"cppo: the run folder {self.folder} is in use by {holder}: two runs writing one folder would "
                "log every step twice and overwrite each other's checkpoints. Wait for that run to end (or stop "
                "it), or start a new run in another folder (without --ckpt_path last / --resume)."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Give the lock up (the file stays: removing it could race with a process about to lock it)."""
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
