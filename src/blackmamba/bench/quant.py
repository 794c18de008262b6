"""``blackmamba bench --quantize``: int8 and int4 weights against bfloat16 and float32 — decode speed, accuracy on
a trained model, and the memory of a loaded 1.5B-shaped model.

- **decode**: batch-1 greedy decoding of a 12 × (Mamba, 8-expert MoE) model, hidden 768, vocab 50280 (random
  weights; the CPU section's BlackMamba-pattern model): int8 and int4 tokens/s against the same model with
  bfloat16 weights, and each against the bandwidth roofline of its own bytes per token (the active weights as
  stored, the state); int4 decoding as the Stepper makes it (weights bound once a generation, the blocks' kernel
  calls replayed in one call) against each kernel called from Python, and against the weights bound every token
  (``model.step``: what replay and binding save, docs/kernels.md); and the LM head's matrix-vector product alone
  (the kernels without the rest of a step: the scan, the Python between the layers) against the same roofline.
  Each ratio is the median of alternated pairs (``harness.paired_ratio``).
- **accuracy** (``--model RUN_DIR``, e.g. the main job's ``runs/shakespeare``): on the run's held-out text, the
  quantized models' next-token predictions against the float32 model's — top-1 agreement and mean KL(fp32 ‖
  quantized) per token — and each one's bits per byte against float32's.
- **memory**: a BlackMamba-1.5B-shaped model (random weights) made in bfloat16 and quantized to int4 (its
  embedding table too, which the tied head reads), in a fresh process: how much its resident set grew (from
  after a tiny model was made the same way, so that the modules it imports are not counted), against the
  bfloat16 model's size.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import BlackMambaConfig, ConfigError
from ..model import BlackMambaLM
from ..ops.linear import linear
from ..quantize import quantize_model
from .harness import decode_bytes_per_token, paired_ratio, row

TARGETS = {"int8_vs_bf16": ("min", 1.6), "int4_vs_bf16": ("min", 2.5), "vs_roofline": ("min", 0.7),
           "int8_top1": ("min", 0.99), "int8_bpb": ("max", 1.005), "int4_bpb": ("max", 1.03),
           "int4_memory": ("max", 0.30)}
MODES = ("int8", "int4")


def _decode_run(model, tokens: int, bind_once: bool = True, replay: bool = True) -> Callable[[], None]:
    """``tokens`` more greedy tokens a call, as ``generate`` makes them (``bind_once=False``: through ``model.step``;
    ``replay=False``: the Stepper bound with ``BLACKMAMBA_CPU_REPLAY=0``, each kernel called from Python)."""
    from .cpu import _decode_tokens

    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    if replay:
        return _decode_tokens(model, prompt, tokens, bind_once)
    saved = os.environ.get("BLACKMAMBA_CPU_REPLAY")
    os.environ["BLACKMAMBA_CPU_REPLAY"] = "0"  # read when the Stepper binds the step
    try:
        return _decode_tokens(model, prompt, tokens, bind_once)
    finally:
        if saved is None:
            del os.environ["BLACKMAMBA_CPU_REPLAY"]
        else:
            os.environ["BLACKMAMBA_CPU_REPLAY"] = saved


def bench_decode(quick: bool) -> list:
    hidden, pairs, vocab = (64, 2, 512) if quick else (768, 12, 50280)
    tokens, reps = (4, 2) if quick else (32, 7)
    torch.manual_seed(0)
    fp32 = BlackMambaLM(BlackMambaConfig(layers=["r", "8"] * pairs, hidden_size=hidden,
                                         ffn_hidden_size=8 * hidden // 3, vocab_size=vocab)).eval()
    models = {mode: quantize_model(copy.deepcopy(fp32), mode) for mode in MODES}  # the same weights, quantized
    bf16 = fp32.to_dtype(torch.bfloat16)
    src = torch.rand((1 << 22) if quick else (1 << 26))
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * 4

    def vs_roofline(run, model) -> tuple[float, tuple[float, float], float]:
        r = paired_ratio(run, lambda: dst.copy_(src), max(1, reps // 2))
        fraction, spread = r.per(tokens * decode_bytes_per_token(model) / copy_bytes)
        return fraction, spread, tokens / r.best_a

    def head_vs_roofline(model) -> tuple[float, tuple[float, float], float]:
        """The LM head alone (one matrix-vector product, vocab x hidden: the kernel without the rest of a
        step): its GB/s against the copy's."""
        w = model.output_layer.weight if model.output_layer is not None else model.embedding.word_embeddings.weight
        nbytes = w.nbytes  # a tensor's, or a QuantizedWeight's bytes and scales
        x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(1)).to(model.dtype)
        gemv = torch.no_grad()(lambda: linear(x, w))
        r = paired_ratio(gemv, lambda: dst.copy_(src), reps)
        fraction, spread = r.per(nbytes / copy_bytes)
        return fraction, spread, nbytes / r.best_a / 1e9

    rows: list = []
    dims = f"{pairs}x(Mamba, 8-expert MoE) hidden={hidden} vocab={vocab}"
    base = _decode_run(bf16, tokens)
    fraction, spread, rate = vs_roofline(base, bf16)
    row(rows, f"decode B=1 bfloat16 weights, {dims}", rate, "tok/s", "bandwidth roofline (its own bytes per token)",
        fraction, spread=spread)
    for mode, m in models.items():
        run = _decode_run(m, tokens)
        p = paired_ratio(base, run, reps)  # time(bf16) / time(quantized): the speed-up
        name = f"decode B=1 {mode} weights, {dims}"
        row(rows, name, tokens / p.best_b, "tok/s", "the same model, bfloat16 weights", p.median,
            TARGETS[f"{mode}_vs_bf16"], quick, spread=p.quartiles())
        fraction, spread, rate = vs_roofline(run, m)
        row(rows, name, rate, "tok/s", "bandwidth roofline (its own bytes per token)", fraction,
            TARGETS["vs_roofline"], quick, spread=spread)
    # binding and replay (docs/kernels.md): int4 decoding as a Stepper makes it (bound once a generation, the
    # blocks' kernel calls replayed in one call), against each kernel called from Python, and bound every token
    stepper = _decode_run(models["int4"], tokens)
    for other, what in ((_decode_run(models["int4"], tokens, replay=False),
                         "the same, each kernel called from Python (BLACKMAMBA_CPU_REPLAY=0)"),
                        (_decode_run(models["int4"], tokens, bind_once=False),
                         "the same, bound every token (model.step)")):
        p = paired_ratio(other, stepper, reps)
        row(rows, f"int4 decode, bound once a generation, blocks replayed (Stepper), {dims}", tokens / p.best_b,
            "tok/s", what, p.median, spread=p.quartiles())
    for mode, m in (("bfloat16", bf16), *models.items()):
        fraction, spread, rate = head_vs_roofline(m)
        row(rows, f"LM head alone ({vocab}x{hidden} matrix-vector), {mode} weights", rate, "GB/s",
            "bandwidth roofline (copy)", fraction, spread=spread)
    return rows


def held_out_windows(run_dir: Path, windows: int):
    """(ids (n, L + 1), tokenizer): the first ``windows`` windows of a run folder's held-out split (prepared as
    the run prepared it: the token cache makes this a lookup)."""
    from ..data.prepare import prepare_data
    from ..data.tokenizer import TOKENIZER_NAME, load_tokenizer
    from ..train.checkpoints import RUN_CONFIG
    from ..train.config import RunConfig

    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG).is_file():
        raise ConfigError(f"--model {run_dir}: the accuracy section needs a run folder (its {RUN_CONFIG} names the "
                          f"held-out text), e.g. the main job's runs/shakespeare")
    d = RunConfig.load(run_dir / RUN_CONFIG).data
    data = prepare_data(d.paths or None, val_fraction=d.val_fraction, vocab_size=d.vocab_size,
                        tokenizer=str(run_dir / TOKENIZER_NAME), text_field=d.text_field, mixture=d.mixture or None)
    L = d.seq_len
    n = min(windows, (len(data.val) - 1) // L)
    ids = torch.as_tensor(data.val[:n * L + 1].astype("int64"))
    return torch.stack([ids[i * L:(i + 1) * L + 1] for i in range(n)]), load_tokenizer(run_dir / TOKENIZER_NAME)


@torch.no_grad()
def bench_accuracy(run_dir, quick: bool) -> tuple[list, dict]:
    """Rows and {mode: {top1_agreement, mean_kl_nats, bpb}} (and fp32's bpb) on the run's held-out windows."""
    from ..checkpoint import load_pretrained

    ids, tok = held_out_windows(run_dir, 2 if quick else 64)
    nbytes = sum(len(tok.decode(w[1:].tolist()).encode()) for w in ids)
    fp32 = load_pretrained(run_dir)
    ref = [F.log_softmax(fp32(w[None, :-1]).logits[0].float(), -1) for w in ids]  # (L, V) each

    def bpb(logp: list) -> float:
        nll = -sum(float(lp.gather(1, w[1:, None]).sum()) for lp, w in zip(logp, ids))
        return nll / math.log(2) / nbytes

    base = bpb(ref)
    out = {"float32": {"bpb": base}, "tokens": int(ids[:, 1:].numel()), "bytes": nbytes}
    rows: list = []
    for mode in MODES:
        q = load_pretrained(run_dir, quantize=mode)
        got = [F.log_softmax(q(w[None, :-1]).logits[0].float(), -1) for w in ids]
        agree = sum(int((a.argmax(1) == b.argmax(1)).sum()) for a, b in zip(ref, got)) / out["tokens"]
        kl = sum(float((a.exp() * (a - b)).sum()) for a, b in zip(ref, got)) / out["tokens"]
        out[mode] = {"top1_agreement": agree, "mean_kl_nats": kl, "bpb": bpb(got)}
        name = f"{mode} weights vs float32, {run_dir} held-out ({out['tokens']:,} tokens)"
        if mode == "int8":
            row(rows, name, agree, "top-1 agreement", "float32's top-1", agree, TARGETS["int8_top1"], quick)
        row(rows, name, out[mode]["bpb"], "bits/byte", f"float32: {base:.4f} bits/byte", out[mode]["bpb"] / base,
            TARGETS[f"{mode}_bpb"], quick)
    return rows, out


MEMORY_CHILD = """
import gc, json, resource, sys, torch
from blackmamba.bench.quant import build_quantized
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
build_quantized("tiny", sys.argv[2])  # the code it runs, imported and loaded before the baseline
gc.collect()
before = rss()
model, bf16_bytes = build_quantized(sys.argv[1], sys.argv[2])
gc.collect()
after = rss()
print(json.dumps({"rss_before": before, "rss_after": after, "bf16_bytes": bf16_bytes,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "model_bytes": sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))}))
"""


def build_quantized(preset_name: str, mode: str):
    """(A ``preset_name`` model with random bfloat16 weights quantized to ``mode``, the bfloat16 model's bytes)."""
    from ..config import preset

    torch.manual_seed(0)
    with torch.device("meta"):
        model = BlackMambaLM(preset(preset_name))
    model.to_empty(device="cpu")  # float32 storage, filled below
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.to_dtype(torch.bfloat16).eval()  # each float32 tensor is released as its bfloat16 copy is made
    bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return quantize_model(model, mode, embedding=True), bf16_bytes


def bench_memory(quick: bool) -> tuple[list, dict]:
    name = "tiny" if quick else "blackmamba-1.5b"
    r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, name, "int4"], capture_output=True, text=True,
                       timeout=3600)
    if r.returncode:
        raise RuntimeError(f"the memory measurement failed: {r.stderr.strip()[-500:]}")
    m = json.loads(r.stdout.strip().splitlines()[-1])
    grown = m["rss_after"] - m["rss_before"]
    rows: list = []
    row(rows, f"int4 {name} (random weights) loaded: resident set growth", grown / 1e6, "MB",
        f"its bfloat16 size ({m['bf16_bytes'] / 1e6:,.0f} MB)", grown / m["bf16_bytes"], TARGETS["int4_memory"],
        quick)
    return rows, m


def run_quant_bench(model: str | None = None, quick: bool = False, log: Callable[[str], None] = print) -> dict:
    from .cpu import machine_limits

    limits = machine_limits(quick)
    log(f"machine: {limits['cpu']}, {limits['threads']} threads, copy bandwidth "
        f"{limits['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    log("... decode: bfloat16, int8, int4")
    rows = bench_decode(quick)
    result = {"device": "cpu", "quick": quick, "torch": torch.__version__, "machine": limits}
    if model is not None:
        log(f"... accuracy on {model}'s held-out text")
        accuracy_rows, result["accuracy"] = bench_accuracy(model, quick)
        rows += accuracy_rows
    else:
        log("... accuracy skipped: give --model RUN_DIR (e.g. the main job's runs/shakespeare)")
    log("... memory of a loaded int4 model (a fresh process)")
    memory_rows, result["memory"] = bench_memory(quick)
    result["rows"] = rows + memory_rows
    return result
