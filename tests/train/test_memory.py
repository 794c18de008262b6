"""The training memory estimate: how it scales, the refusal, what is free, and one check against a real step."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.env import checkout_env

from blackmamba.config import ConfigError
from blackmamba.train.config import build_config
from blackmamba.train.memory import (SKIP_ENV, _cgroup_free, available_bytes, check_training_memory,
                                     estimate_training_bytes)

ROOT = Path(__file__).resolve().parents[2]


def estimate(*sets, vocab=4096):
    return estimate_training_bytes(build_config(None, None, list(sets)), vocab, "cpu")


def test_mamba_activations_are_linear_in_batch_and_seq_len():
    pattern = 'model.layers=["r","r"]'
    base = estimate(pattern, "data.seq_len=512", "optim.batch_size=2")
    for sets in (["data.seq_len=1024", "optim.batch_size=2"], ["data.seq_len=512", "optim.batch_size=4"]):
        double = estimate(pattern, *sets)
        assert double.activations == 2 * base.activations
        assert double.activations_by_kind["mamba"] == 2 * base.activations_by_kind["mamba"]
        # the weights, their gradients and AdamW's moments do not depend on the data
        assert (double.parameters, double.gradients, double.optimizer) == (base.parameters, base.gradients,
                                                                           base.optimizer)
    assert base.optimizer == 2 * base.parameters == 2 * base.gradients


def test_attention_adds_a_quadratic_term_in_seq_len():
    pattern, b = 'model.layers=["a","1","a","1"]', 2
    a = [estimate(pattern, f"data.seq_len={L}", f"optim.batch_size={b}").activations for L in (512, 1024, 2048)]
    # f(L) = alpha L + beta L^2: the second difference isolates beta (an fp32 (b, 1, L, L) mask per layer)
    beta = (a[2] - 2 * a[1]) / (2 * 1024 ** 2)
    assert beta == pytest.approx(b * 4 * 2)
    assert (a[1] - 2 * a[0]) / (2 * 512 ** 2) == pytest.approx(beta)


def test_checkpointing_keeps_only_the_block_inputs():
    plain = estimate("data.seq_len=2048")
    ckpt = estimate("data.seq_len=2048", "train.activation_checkpointing=true")
    # 2 layers of each kind, each keeping h and the residual: (batch 8 × 2048 tokens × 128) fp32 each
    assert ckpt.activations_by_kind["mamba"] == ckpt.activations_by_kind["moe"] == 2 * 2 * 8 * 2048 * 128 * 4
    assert ckpt.activations_by_kind["norms"] == 0
    assert ckpt.activations < plain.activations and ckpt.total < plain.total


def test_refusal_names_the_need_the_settings_and_what_fits():
    cfg = build_config(None, None, ["data.seq_len=100000"])
    est = estimate_training_bytes(cfg, 4096, "cpu")
    free = 22_100_000_000
    with pytest.raises(ConfigError) as info:
        check_training_memory(cfg, 4096, "cpu", available=free)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"needs about {est.total / 1e9:.1f} GB" in msg and "22.1 GB are available" in msg
    assert "data.seq_len=100000 × optim.batch_size=8" in msg and SKIP_ENV in msg
    # the suggested settings fit, and are within 2 significant digits of the largest that do
    seq_len = int(re.search(r"set data\.seq_len=(\d+)", msg).group(1))
    batch = int(re.search(r"optim\.batch_size=(\d+) \(", msg).group(1))
    assert estimate("data.seq_len=%d" % seq_len).total <= free < estimate("data.seq_len=%d" % (seq_len * 1.1)).total
    assert estimate("data.seq_len=100000", f"optim.batch_size={batch}").total <= free
    assert estimate("data.seq_len=100000", f"optim.batch_size={batch + 1}").total > free
    # the log-softmax alone is 13 GB here: checkpointing the mixers would not be enough
    assert "activation_checkpointing" not in msg


def test_refusal_suggests_checkpointing_where_it_is_enough():
    sets = ["data.vocab_size=512", "data.seq_len=16384", "optim.batch_size=2"]
    cfg = build_config(None, None, sets)
    plain, ckpt = estimate(*sets, vocab=512), estimate(*sets, "train.activation_checkpointing=true", vocab=512)
    free = (plain.total + ckpt.total) // 2
    with pytest.raises(ConfigError, match="or train.activation_checkpointing=true;"):
        check_training_memory(cfg, 512, "cpu", available=free)
    # a model too large at any length: only a smaller model helps
    big = build_config("blackmamba-2.8b", None, [])
    with pytest.raises(ConfigError, match="AdamW moments .* choose a smaller model"):
        check_training_memory(big, None, "cpu", available=10 ** 10)


def test_check_passes_when_it_fits_and_can_be_skipped(monkeypatch):
    cfg = build_config(None, None, ["data.seq_len=100000"])
    small = build_config(None, None, [])
    assert check_training_memory(small, 4096, "cpu", available=10 ** 12).total == \
        estimate_training_bytes(small, 4096, "cpu").total
    monkeypatch.setenv(SKIP_ENV, "1")
    assert check_training_memory(cfg, 4096, "cpu", available=1).total > 1


def test_available_bytes_is_sane_here():
    free = available_bytes("cpu")
    if not Path("/proc/meminfo").exists():
        assert free is None
        return
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert isinstance(free, int) and 0 < free <= total
    assert available_bytes("meta") is None
    if not __import__("torch").cuda.is_available():
        assert available_bytes("cuda") is None


def test_cgroup_limits(tmp_path):
    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    (v2 / "memory.max").write_text("max\n")  # no limit at the root
    (v2 / "job" / "memory.max").write_text(f"{8 << 30}\n")
    (v2 / "job" / "memory.current").write_text(f"{3 << 30}\n")
    (v2 / "job" / "memory.stat").write_text(f"anon 1\ninactive_file {1 << 30}\n")
    (tmp_path / "cgroup").write_text("0::/job\n")
    assert _cgroup_free(tmp_path / "cgroup", v2) == 6 << 30
    v1 = tmp_path / "v1"
    (v1 / "memory" / "a").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{4 << 30}\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
    (tmp_path / "cgroup").write_text("4:memory:/a\n1:cpu:/\n")  # "a" itself has no files: its parent limits
    assert _cgroup_free(tmp_path / "cgroup", v1) == 3 << 30
    assert _cgroup_free(tmp_path / "missing", v1) is None


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_estimate_bounds_a_measured_training_step():
    # Mamba and MoE activations (tokens 4 x 2048) dominate; a small vocabulary keeps the head cheap
    sets = ["data.vocab_size=512", "data.seq_len=2048", "optim.batch_size=4"]
    env = checkout_env()
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "measure_train_memory.py"), "--child", "--steps", "2",
                          *sum((["--set", s] for s in sets), [])], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["activations"] > r["state"]
    assert r["measured"] <= r["estimate"] <= 2 * r["measured"], r
