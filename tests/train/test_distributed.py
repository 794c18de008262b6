"""``blackmamba train`` under torchrun, as a user launches it (2 gloo processes, a tiny model): the loss curve of
one process, reproduced by two (with and without expert parallelism), resumed across world sizes, a consolidated
model equal to the shards, and a rank killed with SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.distributed import blackmamba, child_with_rank, free_port, torchrun
from support.env import checkout_env

from blackmamba.checkpoint import load_pretrained
from blackmamba.train.checkpoints import list_checkpoints

ARGS = ["--preset", "tiny", "--no-progress", "--set", "data.vocab_size=300", "--set", "data.seq_len=32",
        "--set", "optim.batch_size=4", "--set", "optim.warmup_steps=2", "--set", "train.sample_tokens=4",
        "--set", "train.log_every=1", "--set", "train.eval_every=3", "--set", "train.checkpoint_every=3"]


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["type"] == "train":
            out[r["step"]] = r[key]
    return out


def val(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "val"}


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process, two processes, two processes with the experts split between them: 6 steps each."""
    from support.text import play_text

    root = tmp_path_factory.mktemp("dist")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"play{i}.txt").write_text(play_text(i, 250), encoding="utf-8")
    env = checkout_env(BLACKMAMBA_CACHE=str(root / "cache"))
    common = ["train", "--data", str(corpus), *ARGS, "--steps", "6"]
    ok(blackmamba(*common, "--out", str(root / "one"), env=env))
    ok(torchrun(2, *common, "--out", str(root / "two"), env=env))
    ok(torchrun(2, *common, "--out", str(root / "two-ep"), "--set", "parallel.ep=2", env=env))
    return root, env


def test_two_processes_follow_the_one_process_loss_curve(runs):
    root, _ = runs
    one = losses(root / "one")
    assert sorted(one) == list(range(1, 7))
    for name in ("two", "two-ep"):
        other = losses(root / name)
        assert sorted(other) == sorted(one)
        for step, loss in one.items():
            assert abs(other[step] - loss) <= 1e-4 * abs(loss), (name, step, other[step], loss)
        # the gradient norm too: Adam would hide a constant scale error in some gradients from the losses
        norms, other_norms = losses(root / "one", "grad_norm"), losses(root / name, "grad_norm")
        for step, g in norms.items():
            assert abs(other_norms[step] - g) <= 1e-4 * g, (name, step, other_norms[step], g)
        for step, v in val(root / "one").items():
            assert abs(val(root / name)[step] - v) <= 1e-4 * v
    assert one[6] < one[1] - 0.05  # it learns: the comparison is not between two flat lines


def test_the_consolidated_model_equals_the_shards_and_loads_like_any_other(runs):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    root, _ = runs
    for name in ("two", "two-ep"):
        ckpt = list_checkpoints(root / name)[-1][1]
        shards = sorted(p.name for p in (ckpt / "state").iterdir())
        assert len(shards) == 2, shards  # one file per rank
        whole = load_pretrained(ckpt)
        sd = {f"model/{k}": torch.empty_like(v) for k, v in whole.state_dict().items()}
        dcp.load(sd, storage_reader=HuggingFaceStorageReader(str(ckpt / "state")), no_dist=True)
        for k, v in whole.state_dict().items():
            assert torch.equal(sd[f"model/{k}"], v), k
        run_model = load_pretrained(root / name)  # the run folder's latest model is the last checkpoint's
        for k, v in run_model.state_dict().items():
            assert torch.equal(whole.state_dict()[k], v), k
    one = load_pretrained(root / "one").state_dict()
    two = load_pretrained(root / "two-ep").state_dict()
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5)  # two runs measured 1.3e-7 and 2.3e-6 apart


def _resume_from_step_3(src: Path, dst: Path) -> None:
    """A copy of ``src`` as if the run had been stopped after its step-3 checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step-0000006")


@pytest.mark.parametrize("src,launch", [("two-ep", "one process"), ("one", "two processes, experts split")])
def test_resuming_with_another_number_of_processes_continues_the_same_curve(runs, src, launch):
    root, env = runs
    dst = root / f"resumed-{src}"
    _resume_from_step_3(root / src, dst)
    if launch == "one process":
        proc = blackmamba("train", "--out", str(dst), "--resume", "--no-progress", "--set", "parallel.ep=1", env=env)
    else:
        proc = torchrun(2, "train", "--out", str(dst), "--resume", "--no-progress", "--set", "parallel.ep=2",
                        env=env)
    ok(proc)
    assert "resuming from" in proc.stdout and "(step 3)" in proc.stdout
    want, got = losses(root / "one"), losses(dst)
    assert sorted(got) == list(range(1, 7))
    for step in (4, 5, 6):
        assert abs(got[step] - want[step]) <= 1e-4 * want[step], (step, got[step], want[step])


def test_a_peer_that_stops_answering_is_one_line_after_the_timeout(runs, tmp_path):
    """SIGSTOP leaves rank 1 alive but silent (torchrun sees nothing wrong): rank 0's next collective fails after
    parallel.timeout_s and it says so in one line, naming the last checkpoint."""
    root, env = runs
    run, err_path = tmp_path / "stopped", tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "blackmamba", "train", "--data", str(root / "corpus"), *ARGS,
           "--steps", "100000", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=100000",
           "--set", "parallel.timeout_s=4", "--out", str(run)]
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
    victim = None
    try:
        deadline = time.monotonic() + 120
        while len(list_checkpoints(run)) < 1:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or did not checkpoint"
            time.sleep(0.2)
        victim = child_with_rank(proc.pid, 1)
        os.kill(victim, signal.SIGSTOP)
        t0, line = time.monotonic(), None
        while line is None and time.monotonic() - t0 < 60:
            time.sleep(0.2)
            line = next((x for x in err_path.read_text().splitlines() if "lost the other processes" in x), None)
        took = time.monotonic() - t0
    finally:
        if victim is not None:
            os.kill(victim, signal.SIGKILL)  # torchrun would wait 30 s for a stopped process to take SIGTERM
        if line is None and proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert line is not None, err_path.read_text()[-2000:]
    assert line.startswith("blackmamba train: rank 0: lost the other processes after step ") and took < 30
    assert "the last complete checkpoint is" in line and "--resume continues from it" in line
    assert proc.returncode != 0


def test_a_rank_killed_with_sigkill_ends_the_job_and_leaves_a_loadable_checkpoint(runs):
    root, env = runs
    run = root / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "blackmamba", "train", "--data", str(root / "corpus"), *ARGS,
           "--steps", "100000", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=100000",
           "--set", "parallel.timeout_s=20", "--out", str(run)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list_checkpoints(run)) < 1:  # trained far enough to have checkpointed
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or did not checkpoint"
            time.sleep(0.2)
        victim = child_with_rank(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)  # the others stop instead of waiting for it
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0 and took < 60
    assert "rank      : 1" in err and "SIGKILL" in err, err[-2000:]
    step, ckpt = list_checkpoints(run)[-1]
    load_pretrained(ckpt)  # complete checkpoints are untouched; a write cut short left only a temporary
    resumed = blackmamba("train", "--out", str(run), "--resume", "--steps", str(step + 2), "--no-progress",
                         env=env)
    ok(resumed)
    assert f"(step {step})" in resumed.stdout
    assert sorted(losses(run)) == list(range(1, step + 3))
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]  # the resumed run removed them


@pytest.mark.parametrize("sets,msg", [
    (["parallel.ep=2"], "launch with torchrun --nproc-per-node 2"),
    (["parallel.sinkhorn_scope=everywhere"], "parallel.sinkhorn_scope: must be global or local"),
    (["parallel.timeout_s=0"], "parallel.timeout_s: must be positive"),
    (["parallel.replicas=2"], "parallel.replicas is not a setting"),
])
def test_parallel_settings_are_checked_in_one_line(tmp_path, sets, msg):
    from blackmamba.cli import main

    args = ["train", "--out", str(tmp_path / "run"), *ARGS]
    for s in sets:
        args += ["--set", s]
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        assert main(args) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sets,msg", [
    (["optim.batch_size=3"], "optim.batch_size = 3 is the global batch, shared by 2 processes: make it a multiple "
                             "of 2"),
    (["optim.batch_size=4096", "data.seq_len=100000"], "the 2 processes on this machine need about"),
])
def test_a_run_the_processes_cannot_share_is_refused_in_one_line(runs, tmp_path, sets, msg):
    root, env = runs
    args = [a for s in sets for a in ("--set", s)]
    proc = torchrun(2, "train", "--out", str(tmp_path / "run"), "--data", str(root / "corpus"), *ARGS, *args,
                    env=env, timeout=120)
    assert proc.returncode != 0
    mine = [line for line in proc.stderr.splitlines() if line.startswith("blackmamba train")]
    assert mine and msg in mine[0], proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_resume_takes_a_new_layout_but_not_new_settings(runs, tmp_path):
    root, env = runs
    run = tmp_path / "run"
    shutil.copytree(root / "one", run)
    proc = blackmamba("train", "--out", str(run), "--resume", "--set", "optim.lr=1", env=env)
    assert proc.returncode == 2 and "only --steps, --set parallel.ep and --set parallel.timeout_s can" in proc.stderr
    proc = blackmamba("train", "--out", str(run), "--resume", "--set", "parallel.sinkhorn_scope=local", env=env)
    assert proc.returncode == 2 and "cannot change it" in proc.stderr  # the routing is the run's, not the launch's
    proc = blackmamba("train", "--out", str(run), "--resume", "--set", "parallel.timeout_s=30", "--no-progress",
                      env=env)
    ok(proc)
    assert json.loads((run / "train_config.json").read_text())["parallel"]["timeout_s"] == 30.0


def test_a_checkpoint_of_the_earlier_one_process_format_still_resumes(runs, tmp_path):
    """Runs written before sharded checkpoints (model.safetensors + trainer_state.safetensors) continue."""
    from safetensors.torch import save_file

    from blackmamba.train.checkpoints import STATE_JSON, load_checkpoint
    from blackmamba.train.config import RunConfig
    from blackmamba.train.optim import build_optimizer

    root, env = runs
    run = tmp_path / "old"
    _resume_from_step_3(root / "one", run)
    ckpt = run / "checkpoints" / "step-0000003"
    model = load_pretrained(ckpt)
    cfg = RunConfig.load(ckpt / "train_config.json")
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    load_checkpoint(ckpt, model, opt)
    sd = opt.state_dict()  # the earlier layout: optimizer.<index>.<name> tensors, the rest in the JSON
    tensors = {f"optimizer.{pid}.{k}": v.contiguous() for pid, st in sd["state"].items() for k, v in st.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(ckpt / "trainer_state.safetensors"))
    meta = json.loads((ckpt / STATE_JSON).read_text())
    meta["optimizer"] = {"param_groups": sd["param_groups"], "scalars": {}}
    (ckpt / STATE_JSON).write_text(json.dumps(meta))
    shutil.rmtree(ckpt / "state")
    shutil.rmtree(ckpt / "rng")
    proc = blackmamba("train", "--out", str(run), "--resume", "--no-progress", env=env)
    ok(proc)
    want, got = losses(root / "one"), losses(run)
    for step in (4, 5, 6):
        assert abs(got[step] - want[step]) <= 1e-4 * want[step], (step, got[step], want[step])
    assert (run / "checkpoints" / "step-0000006" / "state").is_dir()  # the next checkpoint is the new format
