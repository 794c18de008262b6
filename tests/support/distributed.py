"""Helpers for the distributed tests: 2 processes on gloo, either spawned by ``torch.multiprocessing`` (for the
parallel pieces on their own) or launched by ``torchrun`` (``blackmamba train`` as a user runs it), bounded in
time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch.multiprocessing as mp

from .env import checkout_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    fn(rank, *args)


def spawn(fn, *args, nprocs: int = 2, timeout: float = 120) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` processes with torchrun's environment variables set (``fn`` must be a
    module-level function); raises if any of them fails."""
    ctx = mp.start_processes(_entry, args=(fn, nprocs, free_port(), args), nprocs=nprocs, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the {nprocs} processes did not finish in {timeout} s")


def torchrun(nproc: int, *args: str, env: dict | None = None, timeout: float = 300,
             **kw) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N -m blackmamba ARGS`` on 127.0.0.1 with a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "blackmamba", *args]
    return subprocess.run(cmd, env=env or checkout_env(), capture_output=True, text=True, timeout=timeout, **kw)


def blackmamba(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m blackmamba ARGS``: one process."""
    return subprocess.run([sys.executable, "-m", "blackmamba", *args], env=env or checkout_env(),
                          capture_output=True, text=True, timeout=timeout)


def child_with_rank(parent_pid: int, rank: int) -> int | None:
    """The pid of the worker with RANK=rank that torchrun (``parent_pid``) started, if it is running."""
    for line in Path(f"/proc/{parent_pid}/task/{parent_pid}/children").read_text().split():
        try:
            env = Path(f"/proc/{line}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(line)
    return None
