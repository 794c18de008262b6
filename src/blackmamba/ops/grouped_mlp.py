"""The experts' gated MLPs over tokens grouped by expert, as an op (``grouped_mlp``).

    y = grouped_mlp(x, counts, fc1, fc2, activation="silu")
    # x (T, H): rows grouped by expert, counts[e] rows for expert e, in expert order (sum(counts) = T)
    # fc1: E weights (2F, H), gate rows first; fc2: E weights (H, F)
    # y (T, H): y_e = (act(a) * b) @ fc2_e.T with (a, b) = split(x_e @ fc1_e.T, [F, F]), x_e expert e's rows

This is ``layers.mlp.GatedMLP`` (bias-free) applied to each expert's rows. Differentiable in x and in
every weight; an expert with no rows gets no gradient (None), as when its module is not called.

Backends:
- ``reference``: one ``F.linear`` pair per expert, then a concatenation;
- ``cpu`` (float32 without autocast, where PyTorch's MKL is found; otherwise the reference), two schedules:
  - one expert per thread (``csrc/grouped_mlp.cpp``): each thread takes whole experts, largest first, and
    runs their matmuls single-threaded with act(a) * b fused in between, on rows still in cache; the
    backward recomputes act(a) in the same pass that forms the gradients of a and b. Taken when the
    experts' rows share out evenly over the threads (``experts_per_thread``) and the fused kernels built;
  - otherwise each matmul of the forward (2) and of the backward (4) is one MKL batched GEMM over all
    experts on all threads (``ops.mkl``), written straight into the output rows, from ``MIN_MACS``
    multiply-adds in fc1 on (the reference below).
  Per-expert intermediates, no (T, 2F) buffer. Measured at the bench's layer (T=4096, H=1152, F=3072,
  8 experts, 2 threads), forward+backward: the batched schedule 1.09-1.13x one dense expert MLP on all
  rows, one expert per thread 1.02x (README, "CPU kernels").
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from . import backend as _backend
from . import cpu as cpu_ops
from . import mkl

# the experts' activations and their derivatives (gelu: exact erf, as the released inference code)
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}
_ACTIVATION_INPLACE = {"silu": lambda a: F.silu(a, inplace=True), "gelu": torch.ops.aten.gelu_}
_ACTIVATION_BACKWARD = {"silu": torch.ops.aten.silu_backward.grad_input,  # (grad, a, *, grad_input)
                        "gelu": torch.ops.aten.gelu_backward.grad_input}


def _check(x, counts, fc1, fc2, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    if not (len(counts) == len(fc1) == len(fc2)) or not counts:
        raise ValueError(f"grouped_mlp: {len(counts)} counts, {len(fc1)} fc1 and {len(fc2)} fc2 weights: "
                         "need one of each per expert")
    if x.dim() != 2 or sum(counts) != x.shape[0] or min(counts) < 0:
        raise ValueError(f"grouped_mlp: x {tuple(x.shape)} must be (T, H) with T = sum(counts) = {sum(counts)}")
    H = x.shape[1]
    for w1, w2 in zip(fc1, fc2):
        if w1.dim() != 2 or w2.dim() != 2 or w1.shape[1] != H or w1.shape[0] != 2 * w2.shape[1] or w2.shape[0] != H:
            raise ValueError(f"grouped_mlp: expert weights fc1 {tuple(w1.shape)}, fc2 {tuple(w2.shape)} do not fit "
                             f"hidden size {H} (want (2F, {H}) and ({H}, F))")


def grouped_mlp_reference(x, counts, fc1, fc2, activation="silu"):
    act = ACTIVATIONS[activation]
    outs = []
    for xe, w1, w2 in zip(x.split(list(counts)), fc1, fc2):
        if xe.shape[0]:
            a, b = F.linear(xe, w1).chunk(2, dim=-1)
            outs.append(F.linear(act(a) * b, w2))
    return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])


_backend.register("grouped_mlp", "reference", grouped_mlp_reference)


def grouped_mlp(x: torch.Tensor, counts, fc1, fc2, activation: str = "silu", backend: str | None = None):
    """The experts' gated MLPs on rows grouped by expert (see the module docstring): x (T, H) → (T, H)."""
    counts = [int(c) for c in counts]
    _check(x, counts, fc1, fc2, activation)
    _, fn = _backend.resolve("grouped_mlp", x.device, backend)
    return fn(x, counts, list(fc1), list(fc2), activation)


# --------------------------------------------------------------------------- cpu
# Intermediates are per expert, (rows_e, .): blocks that glibc reuses from call to call, where one (T, 2F)
# buffer (100 MB at the bench's size) would be mapped fresh, and faulted in, on every call.
_N, _T = mkl.NO_TRANS, mkl.TRANS
ACTIVATION_CODE = {"silu": 0, "gelu": 1}  # csrc/grouped_mlp.cpp kSilu, kGelu
# One expert per thread when the largest-first schedule's busiest thread gets at most this much more than
# an even share of the rows; else every matmul is one batched GEMM over all experts on all threads.
BALANCE = 1.05


def experts_per_thread(counts, threads: int) -> bool:
    """Whether the experts' rows share out evenly enough over ``threads`` threads, each taking whole experts
    largest first (what csrc/grouped_mlp.cpp does): work is proportional to rows in every matmul."""
    loads = [0] * threads
    for c in sorted(counts, reverse=True):
        loads[loads.index(min(loads))] += c
    return max(loads) <= BALANCE * sum(counts) / threads


def _pointers(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def _by_expert(E: int, live, blocks) -> list:
    """The live experts' blocks at their experts' places, None for the experts without rows."""
    out = [None] * E
    for e, b in zip(live, blocks):
        out[e] = b
    return out


def _kernel_call(name: str, *args) -> None:
    rc = getattr(cpu_ops.library(), name)(mkl.sgemm_address(), *args, torch.get_num_threads())
    if rc == 1:
        raise MemoryError(f"grouped_mlp: {name} could not allocate its per-thread scratch memory")
    if rc:
        raise RuntimeError(f"grouped_mlp: {name} returned {rc}")


class _GroupedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, activation, training, per_thread, *weights):
        E = len(counts)
        fc1, fc2 = weights[:E], weights[E:]
        live = [e for e in range(E) if counts[e]]
        H, F2 = x.shape[1], fc1[0].shape[0]
        hs = [x.new_empty(counts[e], F2) for e in live] if training or not per_thread else []  # [a | b] per row
        y = torch.empty_like(x)  # (T, H)
        if per_thread:
            _kernel_call("bm_grouped_mlp_forward", ACTIVATION_CODE[activation], E, (ctypes.c_int64 * E)(*counts), H,
                         F2 // 2, x.data_ptr(), _pointers(fc1), _pointers(fc2),
                         _pointers(_by_expert(E, live, hs)) if training else None, y.data_ptr())
        else:
            xs = x.split(counts)
            mkl.gemm_batch([(_N, _T, xs[e], fc1[e], h, H) for e, h in zip(live, hs)])  # h_e = x_e @ fc1_e.T
            gs = []
            for a, b in (h.chunk(2, dim=-1) for h in hs):  # g = act(a) * b; in place of a without autograd
                gs.append(ACTIVATIONS[activation](a).mul_(b) if training
                          else _ACTIVATION_INPLACE[activation](a).mul_(b))
            ys = y.split(counts)
            mkl.gemm_batch([(_N, _T, g, fc2[e], ys[e], F2 // 2) for e, g in zip(live, gs)])  # y_e = g_e @ fc2_e.T
        if training:
            ctx.save_for_backward(x, *weights, *hs)
        ctx.counts, ctx.activation, ctx.live, ctx.per_thread = counts, activation, live, per_thread
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        counts, live, act = ctx.counts, ctx.live, ctx.activation
        E = len(counts)
        x, *saved = ctx.saved_tensors
        fc1, fc2, hs = saved[:E], saved[E:2 * E], saved[2 * E:]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[5:]
        H, F2 = x.shape[1], fc1[0].shape[0]
        grads = [w.new_empty(w.shape) if counts[i % E] and need else None
                 for i, (w, need) in enumerate(zip((*fc1, *fc2), need_w))]
        dx = torch.empty_like(x) if need_x else None
        dy = dy.contiguous()  # (a bare pointer goes to the kernel: keep the tensor referenced)
        if ctx.per_thread:
            _kernel_call("bm_grouped_mlp_backward", ACTIVATION_CODE[act], E, (ctypes.c_int64 * E)(*counts), H, F2 // 2,
                         x.data_ptr(), dy.data_ptr(), _pointers(fc1), _pointers(fc2), _pointers(_by_expert(E, live, hs)),
                         _pointers(grads[:E]), _pointers(grads[E:]), None if dx is None else dx.data_ptr())
            return dx, None, None, None, None, *grads
        xs, dys = x.split(counts), dy.split(counts)
        act_a = [ACTIVATIONS[act](h[:, :F2 // 2]) for h in hs]  # recomputed
        dg = [a.new_empty(a.shape) for a in act_a]
        mkl.gemm_batch([(_N, _N, dys[e], fc2[e], d, H) for e, d in zip(live, dg)])  # dg_e = dy_e @ fc2_e
        dh = []
        for h, d, s in zip(hs, dg, act_a):
            a, b = h.chunk(2, dim=-1)
            dh.append(torch.empty_like(h))
            da, db = dh[-1].chunk(2, dim=-1)
            torch.mul(d, s, out=db)
            _ACTIVATION_BACKWARD[act](d.mul_(b), a, grad_input=da)
            s.mul_(b)  # act(a) * b: the forward's fc2 input
        mkl.gemm_batch([(_T, _N, dys[e], g, grads[E + e], counts[e])  # dfc2_e = dy_e.T @ g_e
                        for e, g in zip(live, act_a) if need_w[E + e]]
                       + [(_T, _N, d, xs[e], grads[e], counts[e])  # dfc1_e = dh_e.T @ x_e
                          for e, d in zip(live, dh) if need_w[e]])
        if need_x:
            dxs = dx.split(counts)
            mkl.gemm_batch([(_N, _N, d, fc1[e], dxs[e], F2) for e, d in zip(live, dh)])  # dx_e = dh_e @ fc1_e
        return dx, None, None, None, None, *grads


# Below this many multiply-adds in fc1 (T * H * 2F) the batched path's fixed cost (~130 us a batched call:
# argument checks and ctypes arrays) outweighs its gain. 8 experts, T=2048, fwd+bwd against the reference:
# 1.09x at H=128, F=256 (the README's small preset); 0.98x at H=256, F=512; 0.90-0.94x at H=512-768.
# (One expert per thread has no such threshold: 0.57-0.75x the reference from T=16, H=128 to T=2048, H=512.)
MIN_MACS = 1 << 29


def _float32(x, fc1, fc2) -> bool:
    return (x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and all(w.dtype == torch.float32 for w in (*fc1, *fc2)))


def grouped_mlp_cpu(x, counts, fc1, fc2, activation="silu"):
    if not _float32(x, fc1, fc2):
        return grouped_mlp_reference(x, counts, fc1, fc2, activation)
    per_thread = cpu_ops.available() and experts_per_thread([c for c in counts if c], torch.get_num_threads())
    if not per_thread and x.shape[0] * x.shape[1] * fc1[0].shape[0] < MIN_MACS:
        return grouped_mlp_reference(x, counts, fc1, fc2, activation)
    weights = [w.contiguous() for w in (*fc1, *fc2)]
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights))  # (inside the
    # Function, needs_input_grad says True under no_grad too)
    return _GroupedMLP.apply(x.contiguous(), counts, activation, training, per_thread, *weights)


_backend.register("grouped_mlp", "cpu", grouped_mlp_cpu, mkl.available, devices=("cpu",))
