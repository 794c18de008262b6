"""Writing files and folders so that a crash never leaves a torn one, with the permissions any tool gives.

    with atomic_file(path) as tmp:      # write tmp (a path next to path), then it is renamed to path
        save_file(tensors, tmp)
    with atomic_dir(path) as tmp:       # fill the folder tmp, then it is renamed to path (replacing one there)
        ...
    write_json(path, obj); write_bytes(path, data)

A temporary name is a hidden sibling (``.NAME.<random>.tmp``) on the same file system, so the rename is atomic;
it is fsynced before the rename, removed if the writing fails, and gets the mode a plain ``open`` / ``mkdir``
would give (0666 / 0777 less the umask), not ``mkstemp``'s private 0600 / 0700: a model folder can be shared.
``stale_temporaries(folder)`` lists what a killed writer left behind, for whoever owns the folder to remove.

Before long work whose result is written at the end (training, conversion), ``writable_folder`` and
``check_free_space`` make an unwritable, read-only or too-full destination a one-line ``OutputError`` at once.
``FolderLock`` keeps a second process out of a folder one process is writing (a run folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks through fcntl; FolderLock then only records the owner
    fcntl = None

TEMP_SUFFIX = ".tmp"
_umask_lock = threading.Lock()


class OutputError(ValueError):
    """An output location cannot be written (not a folder, no permission, read-only, too little space)."""


def describe_os_error(e: Exception) -> str:
    """'Permission denied' rather than '[Errno 13] Permission denied: '/x/.y.tmp'' (safetensors reports an I/O
    error of its own as 'Error while serializing: I/O error: File too large (os error 27)')."""
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    found = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", str(e))
    return found.group(1) if found else str(e)


def write_errors() -> tuple[type[Exception], ...]:
    """What a failed write raises: OSError, and safetensors' own error for its file writes."""
    from safetensors import SafetensorError

    return (OSError, SafetensorError)


def writable_folder(path) -> Path:
    """Create the folder ``path`` (and its parents) if needed and check that files can be created in it;
    ``OutputError`` naming the folder and the reason if not."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.", suffix=TEMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{path}: cannot write there ({describe_os_error(e)})") from None
    return path


def check_free_space(folder, needed: int, what: str) -> None:
    """``OutputError`` if the file system of ``folder`` has less than ``needed`` bytes free for ``what``."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed:
        raise OutputError(f"{folder}: {what} needs about {needed / 1e6:,.0f} MB but only {free / 1e6:,.0f} MB "
                          f"are free there")


def umask() -> int:
    """The process's umask (read from /proc where it can be, without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _temp_name(path: Path) -> str:
    return f".{path.name}."


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without an exception, fsync it and rename
    it to ``path``. On an exception nothing is left behind and ``path`` is as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_name(path), suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_dir(path) -> Path:
    """A new empty temporary folder next to ``path`` (the first half of ``atomic_dir``, for writers that fill it
    from several processes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_name(path), suffix=TEMP_SUFFIX))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def commit_dir(tmp: Path, path) -> None:
    """Rename the complete folder ``tmp`` to ``path``, replacing a folder already there (the second half of
    ``atomic_dir``): the old one is moved aside first, so ``path`` never lacks a complete folder."""
    path = Path(path)
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_name(path), suffix=TEMP_SUFFIX))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; when the block ends without an exception, rename it to
    ``path``, replacing a folder already there. On an exception nothing is left behind."""
    tmp = temp_dir(path)
    try:
        yield tmp
        commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_json(path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def stale_temporaries(folder) -> list[Path]:
    """The temporary files and folders writers in ``folder`` left behind when killed (SIGKILL, power loss)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX))


def remove(paths) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


class FolderLock:
    """An exclusive lock on a folder for as long as this object holds it: an ``flock`` on ``folder/.lock``, which
    the operating system releases when the process ends, however it ends (no stale lock after a kill). The file
    names the holder (pid and command line), so the refusal can say who has the folder.

        lock = FolderLock(run_dir, "run folder")   # OutputError if another process holds it
        ...                                        # the whole run
        lock.release()
    """

    NAME = ".lock"

    def __init__(self, folder, what: str = "folder"):
        self.folder = writable_folder(folder)
        path = self.folder / self.NAME
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(f"{self.folder}: cannot create its lock file ({describe_os_error(e)})") from None
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(self._fd, 4096).decode(errors="replace").strip() or "another process"
                os.close(self._fd)
                raise OutputError(f"{self.folder}: this {what} is in use by {holder}; wait for it to finish "
                                  f"or choose another folder") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()} ({' '.join(sys.argv) or 'python'})\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
