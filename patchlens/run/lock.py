"""`RunLock`: one writer per run directory.

The main process of a run holds ``out_dir/run.lock`` from before it reads the manifest until the
run ends. The lock is an exclusive ``flock`` on that file, so the kernel releases it when the
holder dies in any way (SIGKILL included): a lock file left by a dead process is simply taken
over. Where ``flock`` is unavailable (no ``fcntl``, or a file system that refuses it) the file's
recorded pid decides: a live process on this host (or any process on another host) keeps it, a
dead one's lock is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path

from patchlens.errors import InputError

LOCK = "run.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None


class RunLockedError(InputError):
    """Another live process is writing the same run directory."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    return True


class RunLock:
    """Exclusive lock of a run directory (``with RunLock(out): ...``)."""

    def __init__(self, out_dir: str | Path, use_flock: bool | None = None):
        self.path = Path(out_dir) / LOCK
        self.use_flock = fcntl is not None if use_flock is None else use_flock
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()

    def holder(self) -> dict:
        """The record in the lock file (pid, host, since), ``{}`` when unreadable."""
        try:
            rec = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return rec if isinstance(rec, dict) else {}

    def _refuse(self) -> RunLockedError:
        h = self.holder()
        who = (f"process {h.get('pid', '?')} on {h.get('host', '?')} (since {h.get('since', '?')})"
               if h else "another process")
        return RunLockedError(
            f"{self.path.parent} is being written by {who}: two writers would mix their results. "
            f"Wait for that run to finish, or pass another out_dir (--out); if that process is "
            f"gone, delete {self.path}.")

    def acquire(self) -> RunLock:
        """Take the lock or raise `RunLockedError` naming the holder."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.use_flock:
            try:
                self._acquire_flock()
                return self
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self.use_flock = False  # this file system has no flock: fall back to pids
        self._acquire_pidfile()
        return self

    def _acquire_flock(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse() from None
            except OSError:
                os.close(fd)
                raise
            # the previous holder may have unlinked the file between our open and our flock:
            # then we hold a lock on a deleted file, so try again on the current one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, self._record(), 0)
                self._fd = fd
                return
            os.close(fd)

    def _acquire_pidfile(self) -> None:
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                h = self.holder()
                stale = (h.get("host") == socket.gethostname()
                         and isinstance(h.get("pid"), int) and not pid_alive(h["pid"]))
                if not stale:
                    raise self._refuse() from None
                # take the stale lock over: move it aside under a unique name, then check that
                # what we moved is the dead process's record (and not a fresh lock taken since)
                aside = self.path.with_name(f".{LOCK}.{os.getpid()}.stale")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                try:
                    moved = json.loads(aside.read_text() or "{}")
                except (OSError, ValueError):
                    moved = {}
                if moved.get("pid") != h.get("pid"):
                    with contextlib.suppress(OSError):
                        os.rename(aside, self.path)  # not ours to remove: put it back
                    raise self._refuse() from None
                aside.unlink(missing_ok=True)
                continue
            os.write(fd, self._record())
            self._fd = fd
            return
        raise self._refuse()

    def release(self) -> None:
        """Remove the lock file and release the lock (no-op when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # while still holding it, so no one else's lock is removed
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
