"""CPU benchmarks (``blackmamba bench``): every number is a ratio to something measured in the same run.

Machine limits, printed first: the CPU (model and vector extensions: the ratios depend on it), copy bandwidth
(a 256 MiB copy; bytes read + written per second) and ``torch.exp`` throughput (an L2-resident buffer, all
threads). A ratio against a machine limit is not
taken between two separately measured bests: the workload and the limit's own workload run
alternately, 15 pairs (7 for decode), and the median of the per-pair ratios is reported with their
quartiles (``paired_ratios``), because on a shared machine both drift by tens of percent within
seconds. The six scan sizes take their pairs in turn, so that each size is sampled across the whole
scan section. The same holds for the MoE comparison (31 pairs, forward and forward+backward in turn),
generation against transformers' (5 pairs), and the decode latency (long and short context alternate
token by token). Then, each against its baseline:

- scan forward, D=1024, N=16, B in {1, 4}, L in {256, 1024, 4096}: tokens/s against transformers'
  sequential scan (``mamba_selective_scan``, measured at L=256: its cost per token does not fall with
  L) and against the exp bound (torch.exp's rate ÷ D·N: one exp per state update; a timed scan
  sample repeats the call to last as long as the exp workload);
- scan forward+backward (B=1, L=1024, D=1024) against mambapy's parallel scan (``pscan``);
- Mamba mixer forward+backward (d_model 512, L 1024) against transformers' ``MambaMixer`` with
  ``use_mambapy=True``; whole-model prefill (4 Mamba layers, d_model 512, L 1024) against
  transformers' ``MambaModel`` forward;
- batch-1 decode of a pure-Mamba model (hidden 768, 24 layers, vocab 50280), float32 and bfloat16
  weights: tokens/s of ``generate`` against transformers' ``MambaForCausalLM.generate`` (both with the
  prompt's cost subtracted), the fraction of the bandwidth roofline (copy bandwidth ÷ bytes read per
  token) that generation's own decode step reaches, the accuracy cost of bfloat16 weights, and the
  per-token latency after 8192 tokens of context against after 64; and, without a target, the
  roofline fraction of a BlackMamba-pattern model (12 x (Mamba, 8-expert MoE), bfloat16, active
  weights only);
- MoE layer (T=4096, H=1152, F=3072, 8 experts, top-1) forward and forward+backward against one dense
  expert MLP applied to all T tokens.

Baselines from transformers / mambapy run when installed (``pip install 'blackmamba[bench]'``) and
are skipped otherwise. ``quick`` runs every section at toy sizes (a smoke test; no targets judged).
"""

from __future__ import annotations

import copy
import platform
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import BlackMambaConfig
from ..generation.sampling import greedy
from ..generation.stepper import Stepper
from ..layers import GatedMLP, MambaMixer, MoE
from ..model import BlackMambaLM
from ..ops import cpu as cpu_ops
from ..ops.cpu.build import cpu_info
from ..ops.scan import selective_scan
from .harness import best_time, decode_bytes_per_token, optional, paired_ratio, paired_ratios, row


@dataclass
class Sizes:
    scan_d: int = 1024
    scan_batches: tuple = (1, 4)
    scan_lengths: tuple = (256, 1024, 4096)
    hf_scan_length: int = 256
    grad_scan: tuple = (1, 1024, 1024)  # b, l, d
    mixer: tuple = (512, 1024)  # d_model, L
    model_layers: int = 4
    decode: dict = field(default_factory=lambda: dict(layers=24, hidden=768, vocab=50280))
    decode_tokens: int = 32
    hf_decode_tokens: int = 12
    contexts: tuple = (64, 8192)
    moe: tuple = (4096, 1152, 3072, 8)  # T, H, F, E
    reps: int = 3
    paired_reps: int = 15  # alternating pairs whose median ratio is reported (see paired_ratios)
    moe_pairs: int = 31  # the MoE rows' pairs: each one's ratio spreads ±10-15% on a 2-core VM


QUICK = Sizes(scan_d=64, scan_batches=(1,), scan_lengths=(64,), hf_scan_length=32, grad_scan=(1, 64, 64),
              mixer=(32, 64), model_layers=2, decode=dict(layers=2, hidden=32, vocab=256), decode_tokens=4,
              hf_decode_tokens=2, contexts=(4, 32), moe=(128, 32, 64, 4), reps=1, paired_reps=2, moe_pairs=2)

# The targets, as (kind, threshold): "min" ratios must reach it, "max" ratios stay under it.
TARGETS = {
    "scan_vs_hf": ("min", 20.0), "scan_vs_exp_bound": ("min", 0.8), "scan_grad_vs_mambapy": ("min", 10.0),
    "mixer_vs_hf": ("min", 5.0), "prefill_vs_hf": ("min", 4.0), "decode_vs_hf": ("min", 2.0),
    "decode_vs_roofline": ("min", 0.7), "decode_context": ("max", 1.05), "moe_vs_dense": ("max", 1.10),
}


# --------------------------------------------------------------------------- machine limits
def copy_bandwidth(quick: bool) -> float:
    """Bytes read + written per second by a large copy (16 MiB quick, 256 MiB otherwise)."""
    src = torch.rand((1 << 22) if quick else (1 << 26))
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / best_time(lambda: dst.copy_(src), reps=5)


def cpu_description() -> str:
    """The CPU the numbers come from — they depend on its model, not only on its cores (docs/quantization.md):
    its name, x86 family and model, and which of the vector extensions the kernels could use it has."""
    info = cpu_info()
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f", family {info['cpu family']} model {info['model']}"
    flags = set(info.get("flags", "").split())
    ext = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "avx2") if f in flags]
    return f"{name} ({', '.join(ext)})" if ext else name


def machine_limits(quick: bool) -> dict:
    exps, count = exp_workload(quick)
    return {"cpu": cpu_description(), "copy_bandwidth_bytes_per_s": copy_bandwidth(quick),
            "torch_exp_per_s": count / best_time(exps, reps=5), "threads": torch.get_num_threads()}


def exp_workload(quick: bool) -> tuple[Callable[[], None], int]:
    """(fn, number of exps it computes): torch.exp over a 1 MiB buffer (in L2, so this measures the
    vectorised exp itself, not memory), repeated."""
    buf = torch.randn(1 << 18)
    out = torch.empty_like(buf)
    repeat = 4 if quick else 128  # ~20 ms at ~1.7 G exp/s: long enough that best-of-N is not a timer artefact

    def exps():
        for _ in range(repeat):
            torch.exp(buf, out=out)

    return exps, repeat * buf.numel()


# --------------------------------------------------------------------------- scan
def _scan_inputs(b, l, d, n=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, d, generator=g)
    delta = F.softplus(torch.randn(b, l, d, generator=g) - 3)  # typical steps: ~0.05
    A = -torch.exp(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
    B, C = torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g)
    D, z = torch.randn(d, generator=g), torch.randn(b, l, d, generator=g)
    ts = [x, delta, A, B, C, D, z]
    return [t.requires_grad_(requires_grad) for t in ts]


def _hf_scan_fn():
    mm = optional("transformers.models.mamba.modeling_mamba")
    return getattr(mm, "mamba_selective_scan", None) if mm is not None else None


def _hf_scan(fn, x, delta, A, B, C, D, z):
    # transformers' layout: x, delta, z (b, d, l); B, C (b, n, l)
    return fn(x.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D=D,
              z=z.transpose(1, 2), use_mambapy=False)


def bench_scan(sz: Sizes, quick: bool) -> list:
    rows: list = []
    d, n = sz.scan_d, 16
    exps, exp_count = exp_workload(quick)
    hf = _hf_scan_fn()
    hf_tps, work = {}, {}
    for b in sz.scan_batches:
        if hf is not None:
            args = _scan_inputs(b, sz.hf_scan_length, d)
            with torch.no_grad():
                hf_tps[b] = b * sz.hf_scan_length / best_time(lambda: _hf_scan(hf, *args), reps=1 if quick else 2)
        for l in sz.scan_lengths:
            args = _scan_inputs(b, l, d)
            with torch.no_grad():
                # timed samples as long as the exp workload's (~20 ms): a single 1 ms call would be timed
                # mostly on the VM's scheduling jitter
                calls = max(1, round(best_time(exps, 1) / best_time(lambda: selective_scan(*args), 3)))

            def scans(args=args, calls=calls):
                with torch.no_grad():
                    for _ in range(calls):
                        selective_scan(*args)

            work[b, l] = (scans, calls)
    paired = paired_ratios({key: (scans, exps) for key, (scans, _) in work.items()}, sz.paired_reps, warm=True)
    for (b, l), (_, calls) in work.items():
        p = paired[b, l]
        tps = calls * b * l / p.best_a
        # the exp bound: tokens/s if each state update cost one torch.exp (exp_count in t_exp)
        bound, spread = p.per(calls * b * l * d * n / exp_count)
        name = f"scan fwd B={b} L={l} D={d} N={n}"
        row(rows, name, tps, "tok/s", "exp bound (torch.exp)", bound, TARGETS["scan_vs_exp_bound"], quick,
            spread=spread)
        if b in hf_tps:
            row(rows, name, tps, "tok/s", f"transformers sequential (L={sz.hf_scan_length})", tps / hf_tps[b],
                TARGETS["scan_vs_hf"], quick)
    return rows


def _mambapy_scan(pscan, x, delta, A, B, C, D, z):
    # mambapy's selective_scan: materialise exp(delta A) and delta B x (b, l, d, n), then pscan
    deltaA = torch.exp(delta.unsqueeze(-1) * A)
    BX = (delta.unsqueeze(-1) * B.unsqueeze(2)) * x.unsqueeze(-1)
    hs = pscan(deltaA, BX)
    y = (hs @ C.unsqueeze(-1)).squeeze(3) + D * x
    return y * F.silu(z)


def bench_scan_grad(sz: Sizes, quick: bool) -> list:
    rows: list = []
    b, l, d = sz.grad_scan
    args = _scan_inputs(b, l, d, requires_grad=True)

    def ours():
        for t in args:
            t.grad = None
        y, _ = selective_scan(*args)
        y.sum().backward()

    t_ours = best_time(ours, sz.reps)
    name = f"scan fwd+bwd B={b} L={l} D={d} N=16"
    pscan_mod = optional("mambapy.pscan")
    if pscan_mod is None:
        row(rows, name, b * l / t_ours, "tok/s")
        return rows

    def theirs():
        for t in args:
            t.grad = None
        _mambapy_scan(pscan_mod.pscan, *args).sum().backward()

    t_theirs = best_time(theirs, 1 if quick else 2)
    row(rows, name, b * l / t_ours, "tok/s", "mambapy pscan", t_theirs / t_ours, TARGETS["scan_grad_vs_mambapy"], quick)
    return rows


# --------------------------------------------------------------------------- mixer and prefill
def _hf_mamba_config(hidden, layers, vocab, dt_rank, use_mambapy):
    from transformers import MambaConfig

    return MambaConfig(hidden_size=hidden, state_size=16, conv_kernel=4, expand=2, num_hidden_layers=layers,
                       vocab_size=vocab, use_bias=False, use_conv_bias=True, time_step_rank=dt_rank,
                       use_mambapy=use_mambapy, tie_word_embeddings=True)


def bench_mixer(sz: Sizes, quick: bool) -> list:
    rows: list = []
    H, L = sz.mixer
    torch.manual_seed(0)
    ours = MambaMixer(H).train()
    h = torch.randn(1, L, H, requires_grad=True)

    def step(m):
        for p in m.parameters():
            p.grad = None
        h.grad = None
        m(h).sum().backward()

    t_ours = best_time(lambda: step(ours), sz.reps)
    name = f"mixer fwd+bwd d_model={H} L={L}"
    if optional("transformers") is None:
        row(rows, name, L / t_ours, "tok/s")
        return rows
    from transformers.models.mamba.modeling_mamba import MambaMixer as HFMixer

    hf = HFMixer(_hf_mamba_config(H, 1, 16, ours.dt_rank, use_mambapy=True), layer_idx=0).train()
    hf.load_state_dict(ours.state_dict())
    t_hf = best_time(lambda: step(hf), 1 if quick else 2)
    row(rows, name, L / t_ours, "tok/s", "transformers MambaMixer (use_mambapy)", t_hf / t_ours,
        TARGETS["mixer_vs_hf"], quick)
    return rows


def bench_prefill(sz: Sizes, quick: bool) -> list:
    rows: list = []
    H, L = sz.mixer
    vocab = 512  # small: the comparison is about the Mamba layers (transformers' MambaModel has no LM head)
    torch.manual_seed(0)
    ours = BlackMambaLM(BlackMambaConfig(layers=["r"] * sz.model_layers, hidden_size=H, vocab_size=vocab)).eval()
    ids = torch.randint(0, vocab, (1, L))
    with torch.no_grad():
        t_ours = best_time(lambda: ours(ids), sz.reps)
    name = f"prefill {sz.model_layers} Mamba layers d_model={H} L={L}"
    if optional("transformers") is None:
        row(rows, name, L / t_ours, "tok/s")
        return rows
    from transformers import MambaModel

    hf = MambaModel(_hf_mamba_config(H, sz.model_layers, vocab, ours.config.dt_rank_value, False)).eval()
    with torch.no_grad():
        t_hf = best_time(lambda: hf(ids), 1 if quick else 2)
    row(rows, name, L / t_ours, "tok/s", "transformers MambaModel forward", t_hf / t_ours, TARGETS["prefill_vs_hf"],
        quick)
    return rows


# --------------------------------------------------------------------------- decode
def _decode_model(sz: Sizes) -> BlackMambaLM:
    c = sz.decode
    torch.manual_seed(0)
    return BlackMambaLM(BlackMambaConfig(layers=["r"] * c["layers"], hidden_size=c["hidden"],
                                         vocab_size=c["vocab"])).eval()


def _bf16_weights(model: BlackMambaLM) -> BlackMambaLM:
    """A bfloat16 copy, keeping A_log and D in float32 (as load_pretrained does)."""
    return copy.deepcopy(model).to_dtype(torch.bfloat16)


def _generate_rate(generate: Callable[[int], object], tokens: int) -> float:
    """Decode tokens/s of ``generate(n)`` (prompt included): the time difference between n = tokens + 1
    and n = 1 new tokens, so the prompt's prefill cancels out."""
    t1 = best_time(lambda: generate(1), 1, warmup=0)
    tn = best_time(lambda: generate(tokens + 1), 1, warmup=0)
    return tokens / max(tn - t1, 1e-9)


def paired_rates(gen_a: Callable[[int], object], tokens_a: int, gen_b: Callable[[int], object], tokens_b: int,
                 reps: int) -> tuple[float, float]:
    """(median rate_a / rate_b, median rate_a) of two ``_generate_rate`` measurements taken alternately."""
    gen_a(1), gen_b(1)
    pairs = [(_generate_rate(gen_a, tokens_a), _generate_rate(gen_b, tokens_b)) for _ in range(max(1, reps))]
    return statistics.median(a / b for a, b in pairs), statistics.median(a for a, _ in pairs)


def _accuracy(fp32: BlackMambaLM, bf16: BlackMambaLM, ids: torch.Tensor) -> dict:
    """Teacher-forced next-token logits of the bf16-weight model against the fp32 one, token by token."""
    s32, s16 = fp32.new_state(1), bf16.new_state(1)
    agree, kl, err = 0, 0.0, 0.0
    with torch.no_grad():
        for t in range(ids.shape[1]):
            a = fp32(ids[:, t:t + 1], state=s32).logits[0, -1].float()
            b = bf16(ids[:, t:t + 1], state=s16).logits[0, -1].float()
            agree += int(a.argmax() == b.argmax())
            kl += float(F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="sum"))
            err = max(err, float((a - b).abs().max() / a.std()))
    n = ids.shape[1]
    return {"top1_agreement": agree / n, "mean_kl_nats": kl / n, "max_abs_logit_error_over_std": err}


def _decode_tokens(model: BlackMambaLM, prompt: torch.Tensor, tokens: int,
                   bind_once: bool = True) -> Callable[[], None]:
    """``fn()`` greedily decodes ``tokens`` more tokens, one step at a time as ``generate`` does (its
    ``Stepper``, then ``greedy``), continuing the same sequence from call to call: the per-token cost does not
    depend on the context (measured below), so every call costs the same. ``bind_once=False``: each token
    through ``model.step`` instead, its weights bound for that one call (what binding once saves)."""
    with torch.no_grad():
        stepper = Stepper.for_model(model, prompt.shape[0])
        last = [greedy(model(prompt, state=stepper.state).logits[:, -1])]
    step = stepper if bind_once else (lambda tok: model.step(tok, stepper.state))

    def run():
        with torch.no_grad():
            tok = last[0]
            for _ in range(tokens):
                tok = greedy(step(tok))
            last[0] = tok

    return run


def bench_decode(sz: Sizes, limits: dict, quick: bool) -> tuple[list, dict]:
    rows: list = []
    model = _decode_model(sz)
    bf16 = _bf16_weights(model)
    c = sz.decode
    prompt = torch.randint(0, c["vocab"], (1, 8))
    reps = 1 if quick else 5
    src = torch.rand((1 << 22) if quick else (1 << 26))
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * 4
    dims = f"{c['layers']} Mamba layers hidden={c['hidden']} vocab={c['vocab']}"
    hf_generate: Callable[[int], None] | None = None
    if optional("transformers") is not None:
        from transformers import MambaForCausalLM

        hf = MambaForCausalLM(_hf_mamba_config(c["hidden"], c["layers"], c["vocab"], model.config.dt_rank_value,
                                               False)).eval()

        def hf_generate(n):  # noqa: F811  (the None above when transformers is absent)
            with torch.no_grad():
                hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    for label, m in (("float32", model), ("bfloat16", bf16)):
        name = f"decode B=1 {label} weights, {dims}"
        # the roofline: decoding alternates with the copy that measures the bandwidth (see paired_ratios)
        p = paired_ratio(_decode_tokens(m, prompt, sz.decode_tokens), lambda: dst.copy_(src),
                         max(1, sz.paired_reps // 2))
        # the roofline fraction: tokens/s ÷ (bandwidth / bytes per token)
        fraction, spread = p.per(sz.decode_tokens * decode_bytes_per_token(m) / copy_bytes)
        row(rows, name, sz.decode_tokens / p.best_a, "tok/s", "bandwidth roofline", fraction,
            TARGETS["decode_vs_roofline"], quick, spread=spread)
        if hf_generate is not None:  # generate against generate, prompt cost subtracted from both, alternately
            ratio, rate = paired_rates(lambda n: m.generate(prompt, max_new_tokens=n), sz.decode_tokens,
                                       hf_generate, sz.hf_decode_tokens, reps)
            row(rows, name, rate, "tok/s", "transformers MambaForCausalLM.generate (float32)", ratio,
                TARGETS["decode_vs_hf"], quick)
    # BlackMamba's own pattern (no target: the targets are set on the pure-Mamba model)
    torch.manual_seed(0)
    bm = _bf16_weights(BlackMambaLM(BlackMambaConfig(
        layers=["r", "8"] * (c["layers"] // 2), hidden_size=c["hidden"], ffn_hidden_size=8 * c["hidden"] // 3,
        vocab_size=c["vocab"])).eval())
    p = paired_ratio(_decode_tokens(bm, prompt, sz.decode_tokens), lambda: dst.copy_(src), max(1, sz.paired_reps // 2))
    fraction, spread = p.per(sz.decode_tokens * decode_bytes_per_token(bm) / copy_bytes)
    row(rows, f"decode B=1 bfloat16 weights, {c['layers'] // 2}x(Mamba, 8-expert MoE) hidden={c['hidden']}",
        sz.decode_tokens / p.best_a, "tok/s", "bandwidth roofline (active weights)", fraction, spread=spread)
    accuracy = _accuracy(model, bf16, torch.randint(0, c["vocab"], (1, 8 if quick else 64)))
    rows += bench_context(model, sz, quick)
    return rows, accuracy


def bench_context(model: BlackMambaLM, sz: Sizes, quick: bool) -> list:
    """Per-token decode latency after a long context against after a short one (same model, real prefill),
    token by token alternately: the median long-context step time over the median short-context one."""
    vocab = model.config.vocab_size
    steps = {}
    for ctx in sz.contexts:
        state = model.new_state(1)
        ids = torch.randint(0, vocab, (1, ctx))
        with torch.no_grad():
            for lo in range(0, ctx, 1024):  # chunked prefill: the logits of 8192 positions at once are 1.6 GB
                model(ids[:, lo:lo + 1024], state=state)
        tok = ids[:, -1]
        steps[ctx] = lambda state=state, tok=tok: model.step(tok, state)
    short, long = sz.contexts
    times = {short: [], long: []}
    for _ in range(sz.decode_tokens * sz.paired_reps):
        for ctx in (long, short):
            times[ctx].append(best_time(steps[ctx], 1, warmup=0))
    t_long, t_short = statistics.median(times[long]), statistics.median(times[short])
    rows: list = []
    row(rows, f"decode latency at context {long} vs {short}", t_long * 1e3, "ms/tok", f"latency at context {short}",
        t_long / t_short, TARGETS["decode_context"], quick)
    return rows


# --------------------------------------------------------------------------- MoE
def bench_moe(sz: Sizes, quick: bool) -> list:
    rows: list = []
    T, H, Fh, E = sz.moe
    torch.manual_seed(0)
    moe, dense = MoE(H, Fh, E), GatedMLP(H, Fh)
    x = torch.randn(T, 1, H)

    def fwd(m):
        m.eval()  # MoE: the released inference routing
        with torch.no_grad():
            m(x)

    xg = x.clone().requires_grad_()

    def fwd_bwd(m):
        m.train()  # MoE: Sinkhorn routing, as in training
        for p in m.parameters():
            p.grad = None
        xg.grad = None
        m(xg).sum().backward()

    name = f"MoE T={T} H={H} F={Fh} E={E} top-1"
    paired = paired_ratios({"fwd": (lambda: fwd(moe), lambda: fwd(dense)),
                            "fwd+bwd": (lambda: fwd_bwd(moe), lambda: fwd_bwd(dense))}, sz.moe_pairs)
    for k, p in paired.items():
        row(rows, f"{name} {k}", p.best_a * 1e3, "ms", "one dense expert MLP on all T tokens", p.median,
            TARGETS["moe_vs_dense"], quick, spread=p.quartiles())
    return rows


# --------------------------------------------------------------------------- all
def run_cpu_bench(quick: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run every CPU benchmark; returns {"machine", "rows", "bf16_decode_accuracy", ...} (JSON-ready)."""
    sz = QUICK if quick else Sizes()
    if not cpu_ops.available():
        log("note: the fused CPU kernels are unavailable (no compiler?): measuring the reference ops")
    limits = machine_limits(quick)
    log(f"machine: {limits['cpu']}, {limits['threads']} threads, copy bandwidth "
        f"{limits['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (read + write), torch.exp "
        f"{limits['torch_exp_per_s'] / 1e9:.2f} G/s")
    rows: list = []
    for section, fn in (("scan", lambda: bench_scan(sz, quick)),
                        ("scan fwd+bwd", lambda: bench_scan_grad(sz, quick)),
                        ("mixer", lambda: bench_mixer(sz, quick)),
                        ("prefill", lambda: bench_prefill(sz, quick))):
        log(f"... {section}")
        rows += fn()
    log("... decode")
    decode_rows, accuracy = bench_decode(sz, limits, quick)
    rows += decode_rows
    log("... MoE")
    rows += bench_moe(sz, quick)
    note = (f"bfloat16 weights vs float32 (decode, random weights): top-1 agreement "
            f"{100 * accuracy['top1_agreement']:.1f}%, mean KL {accuracy['mean_kl_nats']:.2e} nats, "
            f"max |Δlogit| {accuracy['max_abs_logit_error_over_std']:.3f} logit std")
    return {"device": "cpu", "quick": quick, "torch": torch.__version__, "fused_kernels": cpu_ops.available(),
            "machine": limits, "rows": rows, "bf16_decode_accuracy": accuracy, "notes": [note]}
