"""Training: the CLI end to end on a tiny corpus the test writes (train → generate → info), exact resume
after SIGKILL, a diverging run keeps its last good checkpoint, bits-per-byte accounting, config overrides."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support.env import checkout_env
from support.oslimits import file_size_limit, private_mount
from support.text import corpus_dir, isolated_cache, one_thread  # noqa: F401  (fixtures)

from blackmamba.cli import main
from blackmamba.train.checkpoints import list_checkpoints
from blackmamba.train.config import RunConfig, build_config
from blackmamba.train.optim import param_groups
from blackmamba.train.schedule import lr_at

TINY = ["--preset", "tiny", "--no-progress", "--set", "data.vocab_size=300", "--set", "data.seq_len=32",
        "--set", "optim.batch_size=4", "--set", "optim.warmup_steps=3", "--set", "train.sample_tokens=6"]


def train(out: Path, corpus: Path, *extra: str) -> int:
    return main(["train", "--out", str(out), "--data", str(corpus), *TINY, *extra])


def records(run: Path, kind: str) -> dict[int, dict]:
    """Records of one type by step (the last one wins, as after a resume)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["type"] == kind:
            out[r["step"]] = r
    return out


def test_cli_train_generate_info_end_to_end(tmp_path, corpus_dir, capsys):
    run = tmp_path / "run"
    assert train(run, corpus_dir, "--steps", "8", "--set", "train.eval_every=4", "--set", "train.log_every=2") == 0
    out = capsys.readouterr().out
    assert "bits per byte" in out and "samples" in out and "'ROMEO.\\n'" in out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_config.json", "metrics.jsonl",
                 "summary.json", "samples.txt", "plots/loss.png", "plots/experts.png"):
        assert (run / name).is_file(), name
    val = records(run, "val")
    assert sorted(val) == [4, 8] and all(0 < v["val_bpb"] < 12 for v in val.values())
    train_recs = records(run, "train")
    assert sorted(train_recs) == [2, 4, 6, 8]
    router = train_recs[8]["router"]
    assert [r["layer"] for r in router] == [1, 3]
    assert all(abs(sum(r["fraction"]) - 1) < 1e-3 and r["max_load"] >= 1 and r["sinkhorn_iters"] >= 1 for r in router)
    assert train_recs[8]["tokens_per_s"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["val_bpb"] == val[8]["val_bpb"] and len(summary["samples"]) == 3
    saved = RunConfig.load(run / "train_config.json")
    assert saved.model["layers"] == ["r", "4", "r", "4"] and saved.model["vocab_size"] == 300
    assert [n for n, _ in list_checkpoints(run)] == [8]

    assert main(["generate", str(run), "KING.", "--max-new-tokens", "12", "--seed", "1"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.startswith("KING.") and len(streamed) > len("KING.\n")
    assert main(["generate", str(run), "KING.", "ROMEO.\nThou", "--greedy", "--max-new-tokens", "12"]) == 0
    both = capsys.readouterr().out
    assert "KING." in both and "ROMEO.\nThou" in both and "-" * 40 in both
    assert main(["info", str(run)]) == 0
    assert "79,048 total" in capsys.readouterr().out  # the tiny preset with a 300-id vocabulary
    assert main(["generate", str(run), ""]) == 2
    assert "tokenizes to nothing" in capsys.readouterr().err
    assert train(run, corpus_dir, "--steps", "1") == 2  # the run exists: --resume or another --out
    assert "already holds a run" in capsys.readouterr().err
    with open(corpus_dir / "play0.txt", "a") as f:
        f.write("An edit after the run started.\n")
    assert main(["train", "--out", str(run), "--resume", "--steps", "9", "--no-progress"]) == 2
    assert "trained on other data" in capsys.readouterr().err


def test_user_mistakes_are_one_line_errors(tmp_path, corpus_dir, capsys):
    cases = [
        (["train", "--out", str(tmp_path / "a"), "--data", str(tmp_path / "nope.txt"), *TINY], "no such file"),
        (["train", "--out", str(tmp_path / "a"), *TINY, "--set", "optim.lr=fast"], "optim.lr"),
        (["train", "--out", str(tmp_path / "a"), *TINY, "--set", "optim.nope=1"], "not a setting"),
        (["train", "--out", str(tmp_path / "a"), *TINY, "--set", "model.hidden=3"], "not a model field"),
        (["train", "--out", str(tmp_path / "a"), *TINY, "--config", str(tmp_path / "x.toml")], "no such config"),
        (["train", "--out", str(tmp_path / "a"), "--resume", "--no-progress"], "nothing to resume"),
        (["generate", str(tmp_path / "nope"), "hi"], "no such folder"),
        (["generate", str(tmp_path), "hi", "--temperature", "0"], "--temperature"),
    ]
    (tmp_path / "empty.txt").write_text("\n\n")
    cases.append((["train", "--out", str(tmp_path / "b"), "--data", str(tmp_path / "empty.txt"), *TINY],
                  "empty corpus"))
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert expected in err and err.count("\n") == 0, (argv, err)


def test_resume_after_sigkill_reaches_the_same_losses(tmp_path, corpus_dir):
    args = ["--steps", "16", "--set", "train.log_every=1", "--set", "train.checkpoint_every=4",
            "--set", "train.eval_every=8", "--set", "train.sample_tokens=0"]
    straight = tmp_path / "straight"
    assert train(straight, corpus_dir, *args) == 0

    killed = tmp_path / "killed"
    env = checkout_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "blackmamba", "train", "--out", str(killed), "--data",
                             str(corpus_dir), *TINY, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-0000008").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "summary.json").exists()  # killed mid-run
    done = [n for n, _ in list_checkpoints(killed)]
    assert done and max(done) < 16

    assert main(["train", "--out", str(killed), "--resume", "--no-progress"]) == 0
    a, b = records(straight, "train"), records(killed, "train")
    assert sorted(a) == sorted(b) == list(range(1, 17))
    for step in a:
        assert math.isclose(a[step]["loss"], b[step]["loss"], rel_tol=1e-6), step
    va, vb = records(straight, "val"), records(killed, "val")
    assert sorted(va) == sorted(vb) == [8, 16]
    assert all(math.isclose(va[s]["val_bpb"], vb[s]["val_bpb"], rel_tol=1e-6) for s in va)
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_diverging_run_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, corpus_dir, capsys):
    run = tmp_path / "run"
    # a learning rate this large makes the first update huge (the checkpoint after step 1 is still finite)
    # and the loss at step 2 not a number
    code = train(run, corpus_dir, "--steps", "40", "--set", "optim.lr=1e30", "--set", "optim.min_lr=1e30",
                 "--set", "optim.warmup_steps=0", "--set", "train.checkpoint_every=1", "--set",
                 "train.keep_checkpoints=1")
    assert code == 1
    err = capsys.readouterr().err
    assert "is nan at step" in err or "is inf at step" in err
    assert "last good checkpoint" in err
    (step, path), = list_checkpoints(run)
    assert step == 1 and f"last good checkpoint is {path}" in err and not (run / "summary.json").exists()
    weights = load_file(str(path / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_bits_per_byte_is_summed_nats_over_held_out_bytes(tmp_path, corpus_dir):
    from blackmamba.data.corpus import load_corpus
    from blackmamba.data.prepare import prepare_data
    from blackmamba.model import BlackMambaLM
    from blackmamba.config import preset
    from blackmamba.train.validate import evaluate

    data = prepare_data(load_corpus([corpus_dir], 0.1), vocab_size=300)
    torch.manual_seed(0)
    model = BlackMambaLM(preset("tiny", vocab_size=300)).eval()
    got = evaluate(model, data.val, seq_len=16, batch_size=3)
    ids = torch.from_numpy(np.asarray(data.val, dtype="int64"))[None]  # the whole stream, one window at a time
    nll = 0.0
    with torch.no_grad():
        for s in range(0, ids.shape[1] - 1, 16):
            x, y = ids[:, s:s + 16], ids[:, s + 1:s + 17]
            x = x[:, : y.shape[1]]
            nll += float(torch.nn.functional.cross_entropy(model(x).logits[0], y[0], reduction="sum"))
    assert got["val_tokens"] == ids.shape[1] - 1
    assert got["val_bytes"] == len("".join(d.text for d in load_corpus([corpus_dir], 0.1).val).encode())
    assert math.isclose(got["val_bpb"], nll / math.log(2) / got["val_bytes"], rel_tol=1e-5)
    assert math.isclose(got["val_loss"], nll / got["val_tokens"], rel_tol=1e-5)


def test_config_file_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\n[model]\nhidden_size = 48\n[optim]\nlr = 1e-3\n[train]\nsteps = 7\n'
                    'sample_prompts = ["A", "B"]\n')
    cfg = build_config(None, toml, ["optim.lr=2e-3", "train.device=cpu", 'model.layers=["r", "8"]'])
    assert cfg.preset == "tiny" and cfg.optim.lr == 2e-3 and cfg.train.steps == 7 and cfg.train.device == "cpu"
    assert cfg.train.sample_prompts == ["A", "B"]
    m = cfg.model_config(vocab_size=500)
    assert m.hidden_size == 48 and m.layers == ["r", "8"] and m.vocab_size == 500
    cfg.save(tmp_path / "c.json")
    assert RunConfig.load(tmp_path / "c.json").to_dict() == cfg.to_dict()


def test_no_weight_decay_on_ssm_parameters_norms_and_biases():
    from blackmamba.config import preset
    from blackmamba.model import BlackMambaLM

    model = BlackMambaLM(preset("tiny"))
    decay, keep = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in keep["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert all(n.endswith(("A_log", ".D", "norm.weight", "bias")) or "layernorm" in n for n in kept)
    assert any(n.endswith("A_log") for n in kept) and any(n.endswith("router.bias") for n in kept)
    assert all(n.endswith("weight") and "norm" not in n for n in decayed)
    assert keep["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_warmup_then_cosine_schedule():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55) and lr_at(110, **kw) == pytest.approx(0.1)
    assert all(lr_at(s, **kw) >= lr_at(s + 1, **kw) for s in range(10, 120))


def test_activation_checkpointing_changes_memory_not_results(tmp_path, corpus_dir):
    args = ["--steps", "3", "--set", "train.log_every=1", "--set", "train.sample_tokens=0"]
    assert train(tmp_path / "plain", corpus_dir, *args) == 0
    assert train(tmp_path / "ckpt", corpus_dir, *args, "--set", "train.activation_checkpointing=true") == 0
    a, b = records(tmp_path / "plain", "train"), records(tmp_path / "ckpt", "train")
    assert [a[s]["loss"] for s in (1, 2, 3)] == pytest.approx([b[s]["loss"] for s in (1, 2, 3)], rel=1e-6)


# ----------------------------------------------------------------------------- the run folder
def _spawn_training(run: Path, corpus: Path, *extra: str) -> subprocess.Popen:
    env = checkout_env(OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "blackmamba", "train", "--out", str(run), "--data", str(corpus),
                             *TINY, *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.01)


def test_a_run_folder_is_locked_for_the_life_of_its_run(tmp_path, corpus_dir, capsys):
    run = tmp_path / "run"
    proc = _spawn_training(run, corpus_dir, "--steps", "100000", "--set", "train.checkpoint_every=2")
    try:
        _wait_for(lambda: list_checkpoints(run), proc)  # training, with a checkpoint to resume from
        before = (run / "train_config.json").read_bytes()
        for argv in (["train", "--out", str(run), "--data", str(corpus_dir), *TINY],
                     ["train", "--out", str(run), "--resume", "--no-progress"]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert f"in use by pid {proc.pid}" in err and err.count("\n") == 0, err
        assert (run / "train_config.json").read_bytes() == before
    finally:
        proc.kill()
        proc.wait()
    # the lock dies with its process: the killed run resumes
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"]) == 0


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_clean(tmp_path, corpus_dir):
    run = tmp_path / "run"
    args = ["--steps", "6", "--set", "train.log_every=1", "--set", "train.checkpoint_every=1000",
            "--set", "train.sample_tokens=0"]
    proc = _spawn_training(run, corpus_dir, *args)
    try:
        _wait_for(lambda: (run / "metrics.jsonl").is_file() and len(records(run, "train")) >= 3, proc)
    finally:
        proc.kill()
        proc.wait()
    assert not list_checkpoints(run)
    (run / ".model.safetensors.k1ll3d.tmp").write_bytes(b"torn")  # what a kill mid-write leaves
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed attempt's records are gone, not doubled back
    assert not list(run.glob(".*.tmp"))


def test_resume_refuses_fewer_steps_than_done(tmp_path, corpus_dir, capsys):
    run = tmp_path / "run"
    assert train(run, corpus_dir, "--steps", "4", "--set", "train.sample_tokens=0") == 0
    capsys.readouterr()
    before = (run / "train_config.json").read_bytes()
    assert main(["train", "--out", str(run), "--resume", "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already done 4 steps" in err and err.count("\n") == 0
    assert (run / "train_config.json").read_bytes() == before


def test_non_finite_settings_are_refused(tmp_path, capsys):
    for setting in ("optim.lr=inf", "optim.lr=nan", "optim.grad_clip=inf"):
        assert main(["train", "--out", str(tmp_path / "r"), *TINY, "--set", setting]) == 2
        err = capsys.readouterr().err.strip()
        assert setting.split("=")[0] in err and "finite" in err, err
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.parametrize("options, expected", [("ro", "cannot write there (Read-only file system)"),
                                               ("size=64k", "are free there")])
def test_a_read_only_or_full_output_is_refused_before_the_corpus_is_read(tmp_path, options, expected):
    prefix, mnt = private_mount(tmp_path, options)
    env = checkout_env()
    proc = subprocess.run([*prefix, sys.executable, "-m", "blackmamba", "train", "--out", str(mnt / "run"),
                           "--data", str(tmp_path / "no-such-corpus"), *TINY], env=env, capture_output=True,
                          text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and expected in err and err.count("\n") == 0, err  # not the corpus' error


def test_an_output_that_fills_up_mid_run_is_one_line_and_leaves_nothing_torn(tmp_path, corpus_dir):
    """The file-size limit makes the first checkpoint's write fail as a full disk would."""
    run = tmp_path / "run"
    env = checkout_env(BLACKMAMBA_BACKEND="reference")
    proc = subprocess.run([sys.executable, "-m", "blackmamba", "train", "--out", str(run), "--data", str(corpus_dir),
                           *TINY, "--steps", "2", "--set", "model.hidden_size=256"], env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=file_size_limit(2_000_000))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "could not write (File too large)" in err[0], proc.stderr
    leftovers = [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers and not list_checkpoints(run)
    assert not (run / "model.safetensors").exists()


def test_a_run_that_cannot_fit_in_memory_is_refused_before_the_corpus_is_read(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "no-such-corpus"), *TINY,
                 "--set", "data.seq_len=100000", "--set", "optim.batch_size=4096"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs about" in err and "data.seq_len=100000" in err and err.count("\n") == 0, err
    assert not (tmp_path / "run").exists()
