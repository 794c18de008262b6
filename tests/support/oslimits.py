"""Real operating-system limits for the tests of output errors: a read-only or full file system (a tmpfs in a
private mount namespace) and a file-size limit (RLIMIT_FSIZE), instead of mocked failures."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest


def private_mount(tmp_path: Path, options: str) -> tuple[list[str], Path]:
    """(command prefix, mount point): the prefix runs a command in a private mount namespace with a tmpfs mounted
    with ``options`` (``ro``, ``size=64k``) on the mount point, so the file system is real and vanishes with the
    process. Skips where mounting is not allowed (not root, no unshare)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {mnt}"],
            capture_output=True).returncode != 0:
        pytest.skip("needs root and mount namespaces (unshare -m) to make a read-only or full file system")
    return ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o {options} tmpfs {mnt} && exec "$0" "$@"'], mnt


def file_size_limit(nbytes: int):
    """A ``preexec_fn``: writes beyond ``nbytes`` in the child fail with EFBIG, as on a full disk."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write returns an error instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply
