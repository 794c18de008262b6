"""The processes of a run: one process without torchrun's environment, collectives over 2 gloo processes, and a
peer that stops answering making the collective fail after parallel.timeout_s instead of hanging."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from support.distributed import spawn

from blackmamba.config import ConfigError
from blackmamba.parallel.world import World


def test_without_torchrun_the_world_is_one_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    w = World.from_env(torch.device("cpu"))
    assert (w.rank, w.size, w.main, w.distributed, w.mesh) == (0, 1, True, False, None)
    t = torch.arange(3.0)
    assert w.sum(t) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert w.mean(2.5) == 2.5 and w.broadcast_text("x") == "x"
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        World.from_env(torch.device("cpu"), ep=2)


def _collectives(rank: int, out: str) -> None:
    w = World.from_env(torch.device("cpu"), ep=2, timeout_s=30)
    got = {"sum": w.sum(torch.tensor([rank + 1.0])).tolist(), "mean": w.mean(float(rank)),
           "text": w.broadcast_text("héllo from 0" if rank == 0 else "ignored"),
           "ep": [w.ep_mesh.size(), w.ep_mesh.get_local_rank()], "edp": w.edp_mesh.size()}
    Path(out, f"{rank}.json").write_text(json.dumps(got))
    w.close()


def test_collectives_over_two_processes(tmp_path):
    spawn(_collectives, str(tmp_path))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == {"sum": [3.0], "mean": 0.5, "text": "héllo from 0", "ep": [2, rank], "edp": 1}


def _silent_peer(rank: int, out: str) -> None:
    w = World.from_env(torch.device("cpu"), timeout_s=3)
    flag = Path(out, "done")
    if rank == 1:  # alive, but never joins the collective: only the timeout can end rank 0's wait
        deadline = time.monotonic() + 60
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(0)
    t0 = time.monotonic()
    try:
        w.sum(torch.ones(1))
        result = {"raised": None}
    except RuntimeError as e:
        result = {"raised": str(e).splitlines()[0]}
    result["seconds"] = time.monotonic() - t0
    Path(out, "rank0.json").write_text(json.dumps(result))
    flag.touch()
    os._exit(0)


def test_a_peer_that_stops_answering_fails_the_collective_after_the_timeout(tmp_path):
    spawn(_silent_peer, str(tmp_path), timeout=90)
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert got["raised"] and "Timed out" in got["raised"], got
    assert 2.5 <= got["seconds"] < 20, got
