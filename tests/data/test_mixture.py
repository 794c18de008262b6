"""Weighted mixtures: the window order is a pure function of (seed, k) — the same on resume and however many
ranks share it — and follows the weights whatever the components' sizes; a run on a 3:1 mixture from a TOML file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.text import play_text

from blackmamba.data.dataset import MixtureSampler, WindowSampler


def sampler(sizes, weights, seq_len=8, seed=0):
    return MixtureSampler([np.arange(n, dtype=np.uint32) for n in sizes], weights, seq_len, seed)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(40, 5000), min_size=1, max_size=4), data=st.data(), seed=st.integers(0, 3))
def test_window_k_does_not_depend_on_which_windows_were_read_before(sizes, data, seed):
    """What resuming at any step and slicing a batch over any number of ranks rely on: a sampler asked for
    windows in any order (a resumed run starts late; rank r of N asks for its slice of each batch) answers as
    one that read every window from the start."""
    weights = data.draw(st.lists(st.floats(0.1, 10), min_size=len(sizes), max_size=len(sizes)))
    total = sum(weights)
    if min(weights) / total < 1 / MixtureSampler.BLOCK:
        return  # refused (tested below)
    ks = data.draw(st.lists(st.integers(0, 4000), min_size=1, max_size=30))
    one = sampler(sizes, weights, seed=seed)
    want = {k: w for k, w in ((k, one.window(k)) for k in range(max(ks) + 1))}
    other = sampler(sizes, weights, seed=seed)
    assert [other.window(k) for k in ks] == [want[k] for k in ks]
    for c, s in want.values():
        assert 0 <= s and s + 8 + 1 <= sizes[c]  # every window lies inside its component


def test_a_component_too_light_to_be_read_is_refused():
    from blackmamba.data.corpus import DataError

    with pytest.raises(DataError, match="mixture component 1: its weight is under 1/1000"):
        sampler([1000, 1000], [1.0, 0.0001])


@settings(max_examples=30, deadline=None)
@given(weights=st.lists(st.floats(0.05, 20), min_size=2, max_size=5), k=st.integers(1, 20_000))
def test_every_prefix_follows_the_weights_within_a_blocks_rounding(weights, k):
    if min(weights) / sum(weights) < 1 / MixtureSampler.BLOCK:
        return  # refused (test_a_component_too_light_to_be_read_is_refused)
    s = sampler([1000] * len(weights), weights)
    got = s.windows_per_component(k)
    assert sum(got) == k
    total = sum(weights)
    for n, w in zip(got, weights):
        assert abs(n - k * w / total) <= MixtureSampler.BLOCK / 2 + len(weights)
    if k <= 3000:  # the counts are those of the windows themselves
        assert got == [sum(1 for j in range(k) if s.window(j)[0] == c) for c in range(len(weights))]


def test_one_component_is_its_window_sampler():
    tokens = np.arange(10_000, dtype=np.uint16)
    s = MixtureSampler([tokens], [1.0], 64, seed=3)
    w = WindowSampler(10_000, 64, seed=3)
    assert [s.window(k)[1] for k in range(2500)] == [w.start(k) for k in range(2500)]
    x, y = s.batch(5, 4)
    wx, wy = w.batch(tokens, 5, 4)
    assert (x == wx).all() and (y == wy).all()


def test_a_3_to_1_mixture_of_very_different_sizes_trains_in_proportion(tmp_path, capsys):
    from blackmamba.cli import main

    big, small = tmp_path / "big", tmp_path / "small"
    big.mkdir()
    small.mkdir()
    for i in range(4):
        (big / f"b{i}.txt").write_text(play_text(i, 300))  # ~20x the small one
    (small / "s.jsonl").write_text("".join(json.dumps({"text": play_text(9, 2 + i % 3)}) + "\n" for i in range(40)))
    (tmp_path / "mix.toml").write_text(f"""
preset = "tiny"
[data]
vocab_size = 300
seq_len = 32
[[data.mixture]]
name = "plays"
paths = ["{big}"]
weight = 3
[[data.mixture]]
name = "notes"
paths = ["{small}"]
weight = 1
""")
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--config", str(tmp_path / "mix.toml"), "--no-progress", "--steps",
                 "250", "--set", "optim.batch_size=8", "--set", "train.log_every=50", "--set", "train.eval_every=250",
                 "--set", "train.sample_tokens=0", "--set", "train.checkpoint_every=250"]) == 0
    out = capsys.readouterr().out
    assert "mixture plays: weight 75.0%" in out and "mixture notes: weight 25.0%" in out
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"train"' in line][-1]
    shares = {k: v["share"] for k, v in last["mixture"].items()}
    assert shares == pytest.approx({"plays": 0.75, "notes": 0.25}, abs=0.02)  # 2000 windows of 32 tokens
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line][-1]
    parts = val["val_by_component"]
    assert set(parts) == {"plays", "notes"} and all(0 < p["val_bpb"] < 20 for p in parts.values())
    assert sum(p["val_bytes"] for p in parts.values()) == val["val_bytes"]  # each component's held-out text
    assert "(plays " in out and ", notes " in out  # the validation line names each component's bits per byte
    # windows are tokens: the shares are the token proportions; the small component is read many times over
    assert last["mixture"]["notes"]["epochs"] > 3 * last["mixture"]["plays"]["epochs"]
