"""Measure the peak memory of real training steps and compare it with ``estimate_training_bytes``.

    python tools/measure_train_memory.py                      # the calibration table (~8 min on 2 cores)
    python tools/measure_train_memory.py --set data.seq_len=1024 --set optim.batch_size=8 [--json]

Each configuration runs in a fresh subprocess, as ``blackmamba train`` would: glibc malloc and huge-page
settings of the command (``blackmamba.cli``), ``torch.set_num_threads(train.threads)``, the model built
from the run configuration (vocabulary: ``data.vocab_size``), ``build_optimizer``'s AdamW, and
``--steps`` steps of forward with targets, backward, gradient clipping, AdamW step and zero_grad on
random token windows. The same layer pattern first runs once at toy sizes, so that libraries, kernels
and thread pools are loaded; then freed memory goes back to the kernel (malloc_trim), the peak RSS is
reset (/proc/self/clear_refs) and the current RSS is the baseline. Measured = peak RSS (VmHWM) - baseline.
"Live tensors" is the peak growth of the bytes glibc has handed out (``_LivePeak``): the difference to
the measured peak is the allocator's (freed heap kept resident, holes). Linux with glibc only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the calibration table: (label, --set assignments)
TABLE = [
    ("small L=256 b=1", ["data.seq_len=256", "optim.batch_size=1"]),
    ("small L=256 b=8", ["data.seq_len=256", "optim.batch_size=8"]),
    ("small L=1024 b=1", ["data.seq_len=1024", "optim.batch_size=1"]),
    ("small L=1024 b=8", ["data.seq_len=1024", "optim.batch_size=8"]),
    ("small L=4096 b=1", ["data.seq_len=4096", "optim.batch_size=1"]),
    ("small L=4096 b=8", ["data.seq_len=4096", "optim.batch_size=8"]),
    ("small L=4096 b=8 ckpt", ["data.seq_len=4096", "optim.batch_size=8", "train.activation_checkpointing=true"]),
    ("H=512 L=1024 b=8", ["model.hidden_size=512", "model.ffn_hidden_size=1024", "data.seq_len=1024",
                          "optim.batch_size=8"]),
    ("H=512 L=4096 b=4", ["model.hidden_size=512", "model.ffn_hidden_size=1024", "data.seq_len=4096",
                          "optim.batch_size=4"]),
    ("H=512 L=4096 b=4 ckpt", ["model.hidden_size=512", "model.ffn_hidden_size=1024", "data.seq_len=4096",
                               "optim.batch_size=4", "train.activation_checkpointing=true"]),
    ("[a,1]x2 L=1024 b=8", ['model.layers=["a","1","a","1"]', "data.seq_len=1024", "optim.batch_size=8"]),
    ("[a,1]x2 L=4096 b=2", ['model.layers=["a","1","a","1"]', "data.seq_len=4096", "optim.batch_size=2"]),
    ("[a,1]x2 L=4096 b=2 ckpt", ['model.layers=["a","1","a","1"]', "data.seq_len=4096", "optim.batch_size=2",
                                 "train.activation_checkpointing=true"]),
    ("V=512 L=2048 b=4 (the test's)", ["data.vocab_size=512", "data.seq_len=2048", "optim.batch_size=4"]),
    ("V=512 L=4096 b=8", ["data.vocab_size=512", "data.seq_len=4096", "optim.batch_size=8"]),
    ("[r,1]x2 V=512 H=512 L=2048 b=4 threads=2", ['model.layers=["r","1","r","1"]', "data.vocab_size=512",
                                                  "model.hidden_size=512", "data.seq_len=2048",
                                                  "optim.batch_size=4", "train.threads=2"]),
]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _steps(cfg, vocab: int, steps: int, model_overrides: dict | None = None) -> None:
    import math

    import torch

    from blackmamba.model import BlackMambaLM
    from blackmamba.train.optim import build_optimizer

    mc = cfg.model_config(vocab)
    if model_overrides:
        mc = mc.replace(**model_overrides)
    torch.manual_seed(0)
    model = BlackMambaLM(mc)
    if cfg.train.activation_checkpointing:
        from blackmamba.train.precision import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    model.train()
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    b, L = cfg.optim.batch_size, cfg.data.seq_len
    for _ in range(steps):
        for _ in range(cfg.optim.grad_accum):
            x = torch.randint(0, mc.vocab_size, (b, L))
            y = torch.randint(0, mc.vocab_size, (b, L))
            loss = model(x, targets=y).loss
            float(loss.detach())
            (loss / cfg.optim.grad_accum).backward()
            model.routing_stats()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)


class _LivePeak:
    """The peak of glibc's bytes in use (mallinfo2: heap and mmapped blocks, all arenas), sampled every
    0.5 ms by a thread: the live tensors without the allocator's retained and fragmented memory. None
    where mallinfo2 is missing (not glibc, glibc < 2.33)."""

    def __init__(self):
        import ctypes

        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

        try:
            self._fn = ctypes.CDLL("libc.so.6").mallinfo2
            self._fn.restype = Info
        except (OSError, AttributeError):
            self._fn = None
        self.peak = 0

    def _in_use(self) -> int:
        m = self._fn()
        return m.uordblks + m.hblkhd

    def __enter__(self):
        import threading
        import time

        self._stop = False
        if self._fn is None:
            return self
        self.base = self._in_use()

        def loop():
            while not self._stop:
                self.peak = max(self.peak, self._in_use())
                time.sleep(0.0005)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        if self._fn is not None:
            self._thread.join()

    @property
    def growth(self) -> int | None:
        return None if self._fn is None else self.peak - self.base


def child(sets: list[str], steps: int) -> dict:
    import blackmamba.cli.process
    blackmamba.cli.process.prepare()  # the command's malloc and huge-page settings, before torch loads
    import ctypes
    import gc

    import torch

    from blackmamba.train.config import build_config
    from blackmamba.train.memory import estimate_training_bytes

    cfg = build_config(None, None, sets)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    vocab = cfg.data.vocab_size
    warm = build_config(None, None, sets)
    warm.data.seq_len, warm.optim.batch_size = 32, 2
    _steps(warm, 300, 1, {"hidden_size": 32, "ffn_hidden_size": 64})
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    base = _status("VmRSS")
    with _LivePeak() as live:
        _steps(cfg, vocab, steps)
    peak = _status("VmHWM")
    est = estimate_training_bytes(cfg, vocab, "cpu")
    return {"sets": sets, "measured": peak - base, "live": live.growth, "baseline": base, "estimate": est.total,
            "activations": est.activations, "transient": est.transient, "allocator": est.allocator,
            "state": est.parameters + est.gradients + est.optimizer}


def measure(sets: list[str], steps: int = 3) -> dict:
    """Run ``child`` in a fresh interpreter; its result dict."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps), *sum(
        (["--set", s] for s in sets), [])], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{sets}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.set, a.steps)))
        return
    rows = [("--set " + " ".join(a.set), a.set)] if a.set else TABLE
    if not a.json:
        print("| configuration | estimate MB | measured MB | estimate / measured | live tensors MB |")
        print("|---|---:|---:|---:|---:|")
    for label, sets in rows:
        r = measure(sets, a.steps)
        if a.json:
            print(json.dumps(r))
        else:
            print(f"| {label} | {r['estimate'] / 1e6:.0f} | {r['measured'] / 1e6:.0f} | "
                  f"{r['estimate'] / r['measured']:.2f} | {(r['live'] or 0) / 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
