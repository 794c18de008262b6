"""GPU benchmarks (``blackmamba bench --device cuda``): every number next to its baseline and roofline.

All baselines are measured in the same run, on the same GPU:

- HBM bandwidth: a large device-to-device copy (the memory roofline);
- bf16 matmul throughput: a large GEMM (the compute roofline for training);
- selective scan (B=8, L=2048, D=2048, N=16, bf16): Triton forward and forward+backward — tokens/s,
  the minimal bytes they must move ÷ time as a fraction of the measured bandwidth, speed-up over the
  reference scan (the plain PyTorch loop, on the GPU);
- decode at batch 1, BlackMamba-1.5B and -2.8B shapes with random bf16 weights: tokens/s of the eager
  reference path (``model(token, state=...)``), the eager fused step, and the CUDA graph; the graph's
  fraction of the roofline (measured bandwidth ÷ bytes a token must read: the active weights and the state);
- training tokens/s on a 4-layer model of the 1.5B's width (L=2048): fp32 reference path against
  Triton scan + bf16 autocast + fused AdamW, and the latter's model-FLOPs utilisation against the GEMM.

``run_gpu_bench(quick)`` returns the rows (``bench.harness``; ``quick``: shorter sequences, fewer steps): each
measurement twice, as a ratio to the reference path and as a fraction of its roofline.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable

import torch

from .harness import decode_bytes_per_token, row

SCAN_SHAPE = dict(b=8, l=2048, d=2048, n=16)
DECODE_PRESETS = ("blackmamba-1.5b", "blackmamba-2.8b")


# --------------------------------------------------------------------------- timing and rooflines
def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call of ``fn`` (CUDA events on a GPU, wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Achievable memory bandwidth in bytes/s: a copy reads and writes ``nbytes`` each."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, iters=10)
    return 2 * nbytes / t


def measure_matmul_flops(device: torch.device, n: int = 8192, dtype=torch.bfloat16) -> float:
    """Achievable dense matmul FLOP/s in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / time_fn(lambda: a @ b, device, iters=10)


def scan_bytes(b: int, l: int, d: int, n: int, elem: int, backward: bool) -> int:
    """Bytes a selective scan must move at least (x, delta, z, B, C in, y out; the backward also reads
    them and dy, and writes dx, ddelta, dz, dB, dC); A, D and states are negligible but counted."""
    big, small = b * l * d * elem, b * l * n * elem
    fwd = 4 * big + 2 * small + d * n * 4 + d * 4 + b * d * n * 4
    if not backward:
        return fwd
    return fwd + 4 * big + 2 * small + 3 * big + 2 * small + 2 * (d * n * 4 + d * 4)


# --------------------------------------------------------------------------- benchmarks
def bench_scan(device: torch.device, bandwidth: float, quick: bool) -> list[dict]:
    from ..ops.scan import selective_scan_reference
    from ..ops.triton.scan import selective_scan_triton

    b, l, d, n = SCAN_SHAPE.values()
    if quick:
        l = 512
    dt = torch.bfloat16
    x, z = (torch.randn(b, l, d, device=device, dtype=dt) for _ in range(2))
    delta = torch.nn.functional.softplus(torch.randn(b, l, d, device=device) - 2).to(dt)
    A = -torch.exp(torch.randn(d, n, device=device) * 0.5)
    B, C = (torch.randn(b, l, n, device=device, dtype=dt) for _ in range(2))
    D = torch.randn(d, device=device)
    leaves = [t.requires_grad_() for t in (x, delta, A, B, C, D, z)]
    dy = torch.randn(b, l, d, device=device, dtype=dt)

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(x, delta, A, B, C, D, z)
        return run

    def fwd_bwd(fn):
        def run():
            y, _ = fn(x, delta, A, B, C, D, z)
            torch.autograd.grad(y, leaves, dy)
        return run

    rows = []
    for name, make, backward in (("scan fwd", fwd, False), ("scan fwd+bwd", fwd_bwd, True)):
        t_fast = time_fn(make(selective_scan_triton), device)
        t_ref = time_fn(make(selective_scan_reference), device, warmup=1, iters=2)
        achieved = scan_bytes(b, l, d, n, 2, backward) / t_fast
        bench = f"{name} B={b} L={l} D={d} N={n} bf16"
        row(rows, bench, b * l / t_fast, "tok/s", "reference scan (PyTorch loop)", t_ref / t_fast)
        row(rows, bench, b * l / t_fast, "tok/s", "bandwidth roofline (bytes it must move)", achieved / bandwidth)
    return rows


def _random_model(preset_name: str, device: torch.device, dtype=torch.bfloat16, **overrides):
    from ..config import preset
    from ..model import BlackMambaLM

    with torch.device(device):
        model = BlackMambaLM(preset(preset_name, **overrides))
    return model.to_dtype(dtype).eval()


def _decode_times(name: str, device: torch.device, steps: int) -> tuple[float, float, float, int]:
    """Seconds per batch-1 token: the reference ops, ``model.step`` on the Triton kernels, the CUDA graph of it
    (``Stepper``); and the bytes a token reads."""
    from ..generation.stepper import Stepper
    from ..ops import set_backend

    model = _random_model(name, device)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    tok = prompt[:, -1]
    with torch.no_grad():
        set_backend("reference")
        try:
            ref_state = model.new_state(1)
            model(prompt, state=ref_state)
            t_ref = time_fn(lambda: model.step(tok, ref_state), device, warmup=2, iters=max(steps // 4, 2))
        finally:
            set_backend(None)
        state = model.new_state(1)
        model(prompt, state=state)
        t_eager = time_fn(lambda: model.step(tok, state), device, iters=steps)
        graphed = Stepper(model, 1, graph=True)
        model(prompt, state=graphed.reset())
        t_graph = time_fn(lambda: graphed(tok), device, iters=steps)
    return t_ref, t_eager, t_graph, decode_bytes_per_token(model, 1)


def bench_decode(device: torch.device, bandwidth: float, quick: bool, presets=DECODE_PRESETS) -> list[dict]:
    rows = []
    for name in presets:
        t_ref, t_eager, t_graph, nbytes = _decode_times(name, device, 16 if quick else 64)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        roofline = bandwidth / nbytes  # tokens/s if every step only streamed its bytes at full bandwidth
        for label, t in (("reference ops", t_ref), ("Triton step", t_eager), ("CUDA graph", t_graph)):
            bench = f"decode {name} bf16 batch 1, {label}"
            row(rows, bench, 1 / t, "tok/s", "reference ops", t_ref / t)
            row(rows, bench, 1 / t, "tok/s", "bandwidth roofline", (1 / t) / roofline)
    return rows


def _train_step_time(cfg, ids: torch.Tensor, device: torch.device, fast: bool) -> float:
    """Seconds per optimizer step: fp32 reference path, or Triton + bf16 + fused AdamW."""
    from ..model import BlackMambaLM
    from ..ops import set_backend
    from ..train.precision import autocast

    torch.manual_seed(0)
    with torch.device(device):
        model = BlackMambaLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fast)

    def step():
        with autocast(device) if fast else contextlib.nullcontext():
            loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    set_backend("triton" if fast else "reference")
    try:
        return time_fn(step, device, warmup=1, iters=5 if fast else 2)
    finally:
        set_backend(None)


def bench_training(device: torch.device, matmul_flops: float, quick: bool) -> list[dict]:
    from ..config import preset

    batch, seq = (2, 512) if quick else (4, 2048)
    cfg = preset("blackmamba-1.5b", layers=["r", "8"] * 2)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    rows = []
    t_ref = None
    for label, fast in (("reference fp32", False), ("triton bf16 autocast + fused AdamW", True)):
        t = _train_step_time(cfg, ids, device, fast)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t_ref = t if t_ref is None else t_ref
        tokens = batch * seq / t
        bench = f"train 4-layer 1.5B-width L={seq} batch {batch}, {label}"
        row(rows, bench, tokens, "tok/s", "reference fp32", t_ref / t)
        row(rows, bench, tokens, "tok/s", "model FLOPs / bf16 GEMM rate",
            cfg.train_flops_per_token(seq) * tokens / matmul_flops)
    return rows


def run_gpu_bench(quick: bool = False, log=print) -> dict:
    """Run every GPU benchmark; returns {"device", "machine", "rows"} (ValueError without a GPU or Triton)."""
    from ..ops.triton import available

    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if not available():
        raise ValueError("--device cuda needs Triton: pip install 'blackmamba[gpu]'")
    device = torch.device("cuda")
    bandwidth = measure_bandwidth(device)
    matmul = measure_matmul_flops(device)
    log(f"{torch.cuda.get_device_name(device)}: copy bandwidth {bandwidth / 1e9:.0f} GB/s, "
        f"bf16 matmul {matmul / 1e12:.0f} TFLOP/s (the rooflines below)")
    rows = bench_scan(device, bandwidth, quick)
    rows += bench_decode(device, bandwidth, quick)
    rows += bench_training(device, matmul, quick)
    return {"device": torch.cuda.get_device_name(device), "quick": quick, "torch": torch.__version__,
            "machine": {"copy_bandwidth_bytes_per_s": bandwidth, "bf16_matmul_flops": matmul}, "rows": rows}
