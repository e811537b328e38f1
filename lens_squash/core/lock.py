"""One writer per output folder: an exclusive OS lock that a second run is refused on, at once.

Two runs writing into one folder at once mix their files (one run's fingerprint beside the other's
rows). :func:`lock_folder` takes ``fcntl.flock`` on ``<folder>/.lens_squash.lock`` without waiting
and writes the holder's PID and command into it, so that the refusal of a second run names them.
The kernel drops the lock when its process ends, however it ends: a crash leaves no stale lock
(the file may stay; an unlocked file is free). Released, the file is removed.

Why check the inode after locking: a holder that releases removes the file, and a process that
opened the old file just before may then lock an unlinked inode while a third one locks the new
file. A lock counts only if the file it holds is still the one at the path.
"""

from __future__ import annotations

import errno
import os
import shlex
import sys
import time
from pathlib import Path

__all__ = ["LOCK_NAME", "FolderLock", "FolderLockedError", "lock_folder"]

LOCK_NAME = ".lens_squash.lock"
# a holder writes its PID right after locking; a refused run waits this long to read it
_HOLDER_WAIT_S = 0.5


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock (the message names its PID and command)."""


class FolderLock:
    """A held folder lock; :meth:`release` (or leaving a ``with`` block) gives it back."""

    def __init__(self, folder: Path, fd: int, created: list[Path]):
        self.folder, self.path, self._fd, self._created = folder, folder / LOCK_NAME, fd, created

    def release(self) -> None:
        """Remove the lock file, unlock, and remove the folders the lock created if they stayed empty."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: nobody else can hold this inode
        finally:
            os.close(self._fd)
            self._fd = None
        for folder in reversed(self._created):  # a refused run leaves no empty folder behind
            try:
                folder.rmdir()
            except OSError:
                break

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _make_folders(folder: Path) -> list[Path]:
    missing = []
    for parent in (folder, *folder.parents):
        if parent.exists():
            break
        missing.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _holder(path: Path) -> str:
    """``PID n (command)`` of the lock's holder, read from the lock file."""
    deadline = time.monotonic() + _HOLDER_WAIT_S
    while True:
        try:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        if text or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    pid, _, command = text.partition("\n")
    return f"PID {pid or 'unknown'} ({command or 'command unknown'})"


def _try_lock(path: Path) -> int | None:
    """A descriptor of ``path`` locked exclusively, or None when another process holds it."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released and removed this file meanwhile: lock the new one


def lock_folder(folder: str | os.PathLike, *, name: str = "--out", command: str | None = None) -> FolderLock:
    """Hold ``folder``'s lock (creating the folder) or raise :class:`FolderLockedError` at once.

    ``command`` is written into the lock for a refused run to read (default: this process's argv).
    """
    folder = Path(folder)
    created = _make_folders(folder)
    path = folder / LOCK_NAME
    fd = _try_lock(path)
    if fd is None:
        for made in reversed(created):
            made.rmdir()
        raise FolderLockedError(
            f"{name} {str(folder)!r} is in use by another run, {_holder(path)}; wait for it to finish, "
            "or pass another folder"
        )
    text = f"{os.getpid()}\n{command or shlex.join(['lens-squash', *sys.argv[1:]])}"[:1000]
    os.ftruncate(fd, 0)
    os.write(fd, text.encode("utf-8", "replace"))
    return FolderLock(folder, fd, created)
