"""One writer per folder: a second lock on a held folder is refused at once, naming the holder; the
kernel frees the lock of a process that dies, however it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lens_squash.core.lock import LOCK_NAME, FolderLockedError, lock_folder

_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from lens_squash.core.lock import lock_folder
lock = lock_folder(sys.argv[2], command="holder --probes 32")
print("held", flush=True)
time.sleep(120)
"""


def _start_holder(folder: Path) -> subprocess.Popen:
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, root, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_folder_is_refused_at_once_naming_pid_and_command(tmp_path):
    folder = tmp_path / "out"
    holder = _start_holder(folder)
    try:
        started = time.monotonic()
        with pytest.raises(FolderLockedError) as refused:
            lock_folder(folder)
        assert time.monotonic() - started < 2
        message = str(refused.value)
        assert f"PID {holder.pid}" in message and "holder --probes 32" in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no cleanup runs
        holder.wait(timeout=30)
    with lock_folder(folder) as lock:  # the kernel dropped the dead holder's lock
        assert (folder / LOCK_NAME).read_text().split("\n")[0] == str(os.getpid())
    assert not lock.path.exists() and folder.is_dir()


def test_a_lock_in_one_process_excludes_a_second_lock_and_release_frees_it(tmp_path):
    first = lock_folder(tmp_path / "a" / "b")
    with pytest.raises(FolderLockedError):
        lock_folder(tmp_path / "a" / "b")  # flock locks are per open file: the same process is refused too
    first.release()
    assert not (tmp_path / "a").exists()  # the folders the lock made, empty again, are gone
    second = lock_folder(tmp_path / "a" / "b")
    (tmp_path / "a" / "b" / "result.json").write_text("{}")
    second.release()
    assert (tmp_path / "a" / "b" / "result.json").exists()
