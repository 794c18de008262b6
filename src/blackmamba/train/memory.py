"""Memory a training configuration needs, estimated before training, and a check against what is free.

    est = estimate_training_bytes(run_config, vocab_size)        # MemoryEstimate; est.total in bytes
    free = available_bytes(device)                               # int, or None where it cannot be read
    est = check_training_memory(run_config, vocab_size, device)  # raises ConfigError when est.total > free

The estimate is the peak of one training step as ``Trainer.run`` takes it (forward with targets,
backward, gradient clipping, AdamW, gradients set to None), counted tensor by tensor from what the code
allocates (the ``_mamba``, ``_moe``, ``_mlp``, ``_attention`` and ``_head`` functions list them):

- parameters, gradients and AdamW's two moments: 4 bytes each per parameter (fp32 master weights);
- activations: what autograd holds for the backward at the end of the forward. The largest are the
  log-softmax of the loss (tokens × padded vocab, fp32) and, per Mamba layer, about 8 fp32 values per
  inner channel and token plus the scan's state saved every 16 steps; an attention layer adds an fp32
  (batch, 1, L, L) mask. With ``train.activation_checkpointing`` a block keeps only its inputs;
- transient: the widest working set on top of those, one at a time: the loss's backward (two more
  tokens × vocab fp32 tensors), one layer's backward (with checkpointing: its recomputed activations
  too), or AdamW's step (a temporary per parameter);
- allocator: resident memory beyond the live tensors (``_slack``): freed heap that glibc keeps for reuse
  and the holes between blocks.

Taking every part at its largest at once makes the estimate an upper bound: on CPU (fp32, the command's
malloc settings) it came to 1.0-1.6x the measured peak RSS growth of real training steps
(``tools/measure_train_memory.py``; most of the spread is the allocator's, which varies from run to
run). Under bf16 autocast (CUDA's ``auto``) every activation is still counted at fp32 size, plus a bf16
copy of each and of the weights: meant as an upper bound, not calibrated on a GPU. Not counted: the token
data (memory-mapped) and the interpreter and libraries, which are already taken when ``available_bytes``
is read.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import BlackMambaConfig, ConfigError

SKIP_ENV = "BLACKMAMBA_SKIP_MEMORY_CHECK"
SCAN_CHUNK = 16  # ops/cpu/csrc/scan.h kChunk: the CPU scan saves its (I, N) fp32 state every SCAN_CHUNK steps
SCAN_LANES = 16  # channels rounded up to a whole vector (at most 16 fp32 lanes: AVX-512)
# glibc's malloc as ``blackmamba train`` sets it (blackmamba.cli; glibc's own dynamic threshold stops at the
# same 32 MB): blocks from MMAP_THRESHOLD up are mapped and unmapped whole; smaller ones come from the heap,
# which keeps what is freed resident (up to 256 MB at its top, and any holes). ALLOCATOR_SLACK is the
# smallest share of the heap-sized tensors a step allocates (see ``_slack``) that bounded every measured
# peak (the highest, attention with activation checkpointing, equals its estimate; docs/benchmarks.md); with
# huge-page alignment (THP_MEM_ALLOC_ENABLE=1) a configuration's peak RSS varies by up to a quarter between runs.
MMAP_THRESHOLD = 32 << 20
ALLOCATOR_SLACK = 0.65
GB = 1e9

F32, I64 = 4, 8


@dataclass
class MemoryEstimate:
    """Bytes at the peak of one training step (see the module docstring); ``total`` is their sum.
    ``activations_by_kind`` splits ``activations`` into "mamba", "moe", "mlp", "attention", "norms" (the
    residual stream and the block norms), "head" (final norm, log-softmax, token ids) and "bf16 copies"."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    allocator: int
    activations_by_kind: dict[str, int] = field(default_factory=dict)
    seq_len: int = 0
    batch_size: int = 0
    activation_checkpointing: bool = False

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.activations + self.transient
                + self.allocator)

    def summary(self) -> str:
        """One line: the total and its parts in GB."""
        parts = ", ".join(f"{k} {getattr(self, k) / GB:.2f}" for k in
                          ("parameters", "gradients", "optimizer", "activations", "transient", "allocator"))
        return f"about {self.total / GB:.2f} GB ({parts})"


# ----------------------------------------------------------------------------- per layer kind
# Each returns (tensors saved for the backward, the working set of its backward) as lists of tensor sizes in
# bytes, for b sequences of L tokens (T = b·L). Sizes, not sums: the allocator's slack depends on them.
def _mamba(c: BlackMambaConfig, b: int, L: int, threads: int) -> tuple[list[int], list[int]]:
    T, H, I, N, R = b * L, c.hidden_size, c.d_inner, c.state_size, c.dt_rank_value
    row = T * F32
    # in_proj input (the norm's output) and output x|z; conv output, silu output, x_proj output (R + 2N),
    # dt_proj + bias before softplus, delta (fp32), the scan's y; the scan's state checkpoints
    saved = [row * H, row * 2 * I, row * I, row * I, row * (R + 2 * N), row * I, row * I, row * I,
             b * math.ceil(L / SCAN_CHUNK) * math.ceil(I / SCAN_LANES) * SCAN_LANES * N * F32]
    # backward, at its widest: dy and the scan's dx, ddelta, dz with its dB and dC partial sums per thread
    # (later dz, the conv's dx and the in_proj output's gradient (2I) are as wide); the output's gradient
    # and the residual's
    work = [row * I] * 4 + [threads * row * N] * 2 + [row * H] * 2
    return saved, work


def _moe(c: BlackMambaConfig, experts: int, b: int, L: int, kernel: bool) -> tuple[list[int], list[int]]:
    T, H, F = b * L, c.hidden_size, c.ffn_hidden_size
    row, rows = T * F32, T * F32 // experts  # an expert's share of the rows (Sinkhorn balances them)
    # ops/cpu/grouped_mlp.py's one-expert-per-thread kernel (`kernel`: fp32 on CPU with 1 thread, where it always
    # runs): each expert's (rows, 2F) fc1 output; otherwise (batched GEMMs, per-expert modules, CUDA's
    # grouped mm) up to fc1's output, act(a) and act(a) * b
    hidden = [rows * 2 * F] * experts + ([] if kernel else [rows * F] * 2 * experts)
    # router input, sigmoid(logits), gate, sorted input, experts' hidden, unsorted output; gather index,
    # the two permutations (int64)
    saved = [row * H, row * experts, row, row * H, *hidden, row * H, T * I64, T * I64, T * I64]
    # forward: router logits, Sinkhorn's cost and assignment; backward: dy, the permuted dy, dx, the
    # gate's gradient, the expert kernel's scratch (dg, g, dh: 4F per row of the largest expert, bounded
    # by all rows)
    work = [row * experts] * 3 + [row * H] * 4 + [row * 4 * F]
    return saved, work


def _mlp(c: BlackMambaConfig, b: int, L: int) -> tuple[list[int], list[int]]:
    row, H, F = b * L * F32, c.hidden_size, c.ffn_hidden_size
    saved = [row * H, row * 2 * F, row * F, row * F]  # input, fc1 output, act(a), act(a) * b
    return saved, [row * H, row * H, row * 2 * F, row * F, row * F]  # their gradients


def _attention(c: BlackMambaConfig, b: int, L: int) -> tuple[list[int], list[int]]:
    row, H = b * L * F32, c.hidden_size
    # input, qkv, rotated q and k, the attention output and its (b, l, H) copy, logsumexp per head; the
    # causal mask as fp32 (b, 1, L, L): scaled_dot_product_attention's fused CPU kernel (the one it takes
    # here) saves the boolean mask converted; only its math path would hold (b, heads, L, L) scores
    saved = [row * H, row * 3 * H, row * H, row * H, row * H, row * H, row * c.num_heads, b * L * L * F32]
    # forward: the boolean masks (L, L) and (b, 1, L, L) x 3; backward: gradients of the same tensors
    work = [L * L] + [b * L * L] * 3 + [row * H] * 5 + [row * 3 * H]
    return saved, work


def _head(c: BlackMambaConfig, b: int, L: int, bf16: bool) -> tuple[list[int], list[int], list[int]]:
    """(saved, forward peak extra, backward working set) of the final norm, logits and loss."""
    T, H, V = b * L, c.hidden_size, c.padded_vocab_size
    # token ids and targets, the final residual, LayerNorm output, mean and rstd, log-softmax (fp32)
    saved = [T * I64, T * I64, T * F32 * H, T * F32 * H, T * F32, T * F32, T * V * F32]
    logits = [T * V * 2, T * V * F32] if bf16 else [T * V * F32]  # (bf16: and the fp32 copy for the loss)
    work = [T * V * F32] * 2 + ([T * V * 2] if bf16 else [])  # nll_loss's and log_softmax's gradients
    return saved, logits, work


def _parameters(c: BlackMambaConfig) -> list[int]:
    """Bytes of every parameter tensor (fp32), from the sizes alone (``BlackMambaLM``'s modules)."""
    H, I, N, K, R, F = c.hidden_size, c.d_inner, c.state_size, c.conv_width, c.dt_rank_value, c.ffn_hidden_size
    out = [c.padded_vocab_size * H] * (1 if c.tie_embeddings else 2) + [H, H]  # embedding (head), final norm
    for kind, experts in c.layer_kinds():
        out.append(H)  # the block's norm
        if kind == "mamba":
            out += [2 * I * H, I * K, I, (R + 2 * N) * I, I * R, I, I * N, I, H * I]
        elif kind == "attention":
            out += [3 * H * H, H * H]
        else:
            out += [experts * H, experts] if kind == "moe" else []
            out += [2 * F * H, H * F] * max(experts, 1)
    return [n * F32 for n in out]


def _heap(sizes) -> int:
    return sum(n for n in sizes if n < MMAP_THRESHOLD)


# ----------------------------------------------------------------------------- estimate
def _device_type(run_config, device) -> str:
    if device is not None:
        return getattr(device, "type", str(device).split(":")[0])
    want = run_config.train.device
    if want == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def tensor_sizes(run_config, vocab_size, device) -> tuple[dict[str, list[int]], list[list[int]], list[int]]:
    """Tensor sizes in bytes of one training step: (saved for the backward, by layer kind; the working sets that
    come on top of them one at a time: each layer's backward, the head's forward and backward, AdamW's step;
    parameters). What ``estimate_training_bytes`` sums, and ``parallel.plan`` reads per rank."""
    c = run_config.model_config(vocab_size)
    b, L = run_config.optim.batch_size, run_config.data.seq_len
    t = run_config.train
    dev = _device_type(run_config, device)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and dev == "cuda")
    threads = t.threads or os.cpu_count() or 1
    T, H = b * L, c.hidden_size
    params = _parameters(c)
    saved_by_kind: dict[str, list[int]] = {"norms": []}
    phases = []
    for kind, experts in c.layer_kinds():
        if kind == "mamba":
            saved, work = _mamba(c, b, L, threads)
        elif kind == "moe":
            saved, work = _moe(c, experts, b, L, dev == "cpu" and threads == 1 and not bf16)
        elif kind == "mlp":
            saved, work = _mlp(c, b, L)
        else:
            saved, work = _attention(c, b, L)
        # the block's residual (fp32) and RMSNorm's normalised input and 1/rms; its output is the mixer's input
        norms = [T * H * F32, T * H * F32, T * F32]
        if t.activation_checkpointing:  # only the block's inputs (h, residual) are kept; its backward recomputes
            work, saved, norms = work + saved + norms, [T * H * F32, T * H * F32], []
        saved_by_kind.setdefault(kind, []).extend(saved)
        saved_by_kind["norms"] += norms
        phases.append(work)
    head_saved, head_forward, head_work = _head(c, b, L, bf16)
    saved_by_kind["head"] = head_saved
    phases += [head_forward, head_work, params]  # AdamW: sqrt of the second moment, one per parameter
    if bf16:  # a bf16 copy of every saved tensor and weight: matmul inputs are cast and kept, weights cast once
        saved_by_kind["bf16 copies"] = [n // 2 for sizes in [*saved_by_kind.values(), params]
                                        for n in sizes]
    return saved_by_kind, phases, params


def _slack(saved: list[int], phases: list[list[int]], params: list[int], recompute: bool) -> int:
    """Resident memory the allocator holds beyond the live tensors at the peak: the heap grown for a working
    set wider in heap-sized tensors than the peak's, and ALLOCATOR_SLACK of the heap-sized tensors a step
    frees and allocates again (saved activations, the widest working set, gradients and AdamW's temporaries).
    ``recompute`` (activation checkpointing): a block's backward allocates its activations again before their
    gradients, two rounds of heap allocation in one phase, so the widest working set counts twice."""
    widest = max(_heap(work) for work in phases)
    kept = widest - _heap(max(phases, key=sum))
    return kept + int(ALLOCATOR_SLACK * (_heap(saved) + widest * (2 if recompute else 1) + 2 * _heap(params)))


def estimate_training_bytes(run_config, vocab_size: int | None = None, device=None) -> MemoryEstimate:
    """Peak bytes of one training step of ``run_config`` (a ``RunConfig``) on ``device`` (default: what
    ``train.device`` resolves to), with the tokenizer's ``vocab_size`` (None: the preset's). Raises
    ``ConfigError`` for an invalid model configuration. See the module docstring for what is counted."""
    saved_by_kind, phases, params = tensor_sizes(run_config, vocab_size, device)
    saved = [n for sizes in saved_by_kind.values() for n in sizes]
    P = sum(params)
    return MemoryEstimate(parameters=P, gradients=P, optimizer=2 * P, activations=sum(saved),
                          transient=sum(max(phases, key=sum)),
                          allocator=_slack(saved, phases, params, run_config.train.activation_checkpointing),
                          activations_by_kind={k: sum(v) for k, v in saved_by_kind.items()},
                          seq_len=run_config.data.seq_len, batch_size=run_config.optim.batch_size,
                          activation_checkpointing=run_config.train.activation_checkpointing)


# ----------------------------------------------------------------------------- what is free
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_free(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under the tightest cgroup memory limit from this process's cgroup up to the root
    (v2: memory.max - memory.current; v1: memory.limit_in_bytes - memory.usage_in_bytes), counting
    inactive page cache as free, since the kernel reclaims it before it kills; None without a limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "-", "")
        if controllers == "":
            base, limit, usage, inactive = root, "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):
            base, limit, usage, inactive = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", \
                "total_inactive_file"
        else:
            continue
        parts = [p for p in path.strip("/").split("/") if p]
        # this process's cgroup and its ancestors (inside a container only the root may be visible)
        for depth in range(len(parts), -1, -1):
            d = base.joinpath(*parts[:depth])
            cap, used = _read_int(d / limit), _read_int(d / usage)
            if cap is None or used is None:
                continue
            free = max(cap - used + _stat(d / "memory.stat", inactive), 0)
            best = free if best is None else min(best, free)
    return best


def _mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes(device="cpu") -> int | None:
    """Bytes this process can still allocate on ``device``: on CPU the smaller of MemAvailable
    (/proc/meminfo) and the room under a cgroup memory limit; on CUDA the driver's free memory plus what
    PyTorch's caching allocator holds unused. None where it cannot be read (not Linux, another device)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if kind != "cpu":
        return None
    found = [v for v in (_mem_available(), _cgroup_free()) if v is not None]
    return min(found) if found else None


# ----------------------------------------------------------------------------- the check
def _fits(run_config, vocab_size, device, free: int, **changes) -> bool:
    cfg = copy.deepcopy(run_config)
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return estimate_training_bytes(cfg, vocab_size, device).total <= free


def _largest(fits, hi: int, lo: int) -> int | None:
    """The largest n in [lo, hi] with fits(n) (fits is monotone), rounded down to 2 significant digits."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    step = 10 ** max(len(str(lo)) - 2, 0)
    return max(lo // step * step, 1)


def check_training_memory(run_config, vocab_size: int | None, device="cpu", available: int | None = None
                          ) -> MemoryEstimate:
    """The estimate (``estimate_training_bytes``) for training ``run_config`` on ``device``; raises
    ``ConfigError`` when it exceeds ``available`` (default: ``available_bytes(device)``), with one line:
    the need, its largest part and the settings behind it, what is free, and the settings that would fit
    (the largest data.seq_len, the largest optim.batch_size, activation checkpointing where it is enough).

    Call it after the data is loaded and before the model is built, so what is free already excludes
    them. No check (the estimate is only returned) where the free memory cannot be read, or when the
    environment sets BLACKMAMBA_SKIP_MEMORY_CHECK=1 (the estimate is an upper bound, up to ~1.6x the
    measured peak: a configuration just over the line may still fit)."""
    est = estimate_training_bytes(run_config, vocab_size, device)
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return est
    free = available_bytes(device) if available is None else available
    if free is None or est.total <= free:
        return est
    L, b = run_config.data.seq_len, run_config.optim.batch_size
    state = est.parameters + est.gradients + est.optimizer
    fixes = []
    seq_len = _largest(lambda n: _fits(run_config, vocab_size, device, free, data__seq_len=n), L - 1, 2)
    if seq_len is not None:
        fixes.append(f"data.seq_len={seq_len}")
    batch = _largest(lambda n: _fits(run_config, vocab_size, device, free, optim__batch_size=n), b - 1, 1) \
        if b > 1 else None
    if batch is not None:
        fixes.append(f"optim.batch_size={batch} (optim.grad_accum keeps the tokens per step)")
    if not run_config.train.activation_checkpointing and _fits(run_config, vocab_size, device, free,
                                                               train__activation_checkpointing=True):
        fixes.append("train.activation_checkpointing=true")
    if est.total - state >= state:
        why = f"activations {(est.total - state) / GB:.1f} GB at data.seq_len={L} × optim.batch_size={b}"
    else:
        why = f"weights, gradients and AdamW moments {state / GB:.1f} GB"
    fix = ("set " + " or ".join(fixes)) if fixes else "choose a smaller model (preset, model.hidden_size, model.layers)"
    raise ConfigError(f"this configuration needs about {est.total / GB:.1f} GB to train ({why}), but "
                      f"{free / GB:.1f} GB are available: {fix}; {SKIP_ENV}=1 skips this check")


def check_rank_memory(run_config, vocab_size: int, world) -> None:
    """``check_training_memory`` for one of N processes: the per-rank need ``blackmamba info --world-size``
    prints (``parallel.plan``), times the processes sharing this machine's memory on CPU (LOCAL_WORLD_SIZE), against
    what is free; raises ``ConfigError`` in one line when it does not fit. Skipped like the one-process check."""
    from ..parallel.plan import plan_training
    from .precision import uses_bf16

    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return
    d, o, t = run_config.data, run_config.optim, run_config.train
    device = world.device.type
    plan = plan_training(run_config.model_config(vocab_size), world_size=world.size, batch=o.batch_size,
                         seq=d.seq_len, ep=run_config.parallel.ep, grad_accum=o.grad_accum,
                         dtype="bf16" if uses_bf16(world.device, t.precision) else "fp32",
                         activation_checkpointing=t.activation_checkpointing, device=device)
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device == "cpu" else 1
    free = available_bytes(world.device)
    if free is None or plan.total * sharing <= free:
        return
    who = f"the {sharing} processes on this machine need" if sharing > 1 else "each process needs"
    raise ConfigError(f"{who} about {plan.total * sharing / GB:.1f} GB to train on {world.size} processes "
                      f"(blackmamba info --world-size {world.size} ... shows the parts), but {free / GB:.1f} GB are "
                      f"available: use more machines or fewer processes on this one, a smaller optim.batch_size or "
                      f"data.seq_len, or "
                      f"train.activation_checkpointing=true; {SKIP_ENV}=1 skips this check")
