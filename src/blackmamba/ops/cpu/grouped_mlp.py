"""The ``cpu`` backend of op ``moe_experts``: the tokens sorted by expert (``ops.moe.sort_by_expert``), then every
expert's gated MLP on its rows in one grouped call, float32 without autocast where PyTorch's MKL is found
(otherwise, and for operands that are not plain weights, the reference). Two schedules:

- one expert per thread (``csrc/grouped_mlp.cpp``): each thread takes whole experts, largest first, and runs their
  matmuls single-threaded with act(a) * b fused in between, on rows still in cache; the backward recomputes act(a)
  in the same pass that forms the gradients of a and b. Taken when the experts' rows share out evenly over the
  threads (``experts_per_thread``);
- otherwise each matmul of the forward (2) and of the backward (4) is one MKL batched GEMM over all experts on all
  threads (``mkl.gemm_batch``), written straight into the output rows, from ``MIN_MACS`` multiply-adds in fc1 on.

Per-expert intermediates, no (T, 2F) buffer: blocks that glibc reuses from call to call, where one (T, 2F) buffer
would be mapped fresh, and faulted in, on every call. Differentiable in x, the gate and every weight; an expert
with no rows gets no gradient (None), as when its module is not called. docs/benchmarks.md has the measurements.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from .. import registry
from ..activations import ACTIVATIONS
from ..linear import all_tensors
from ..moe import PermuteRows, experts_on_sorted, moe_experts_reference, sort_by_expert
from . import build, mkl
from .decode import ACTIVATION_CODE
from .replay import launch

# in-place activations and the derivatives (gelu: exact erf, as the released inference code)
_ACTIVATION_INPLACE = {"silu": lambda a: F.silu(a, inplace=True), "gelu": torch.ops.aten.gelu_}
_ACTIVATION_BACKWARD = {"silu": torch.ops.aten.silu_backward.grad_input,  # (grad, a, *, grad_input)
                        "gelu": torch.ops.aten.gelu_backward.grad_input}


_N, _T = mkl.NO_TRANS, mkl.TRANS
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
    rc = launch(getattr(build.library(), name), mkl.sgemm_address(), *args, torch.get_num_threads())
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


# Below this many multiply-adds in fc1 (T * H * 2F) the batched schedule's fixed cost per call (argument checks and
# ctypes arrays) outweighs its gain (docs/benchmarks.md); one expert per thread has no such threshold.
MIN_MACS = 1 << 29


def _float32(x, fc1, fc2) -> bool:
    return (x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and all(w.dtype == torch.float32 for w in (*fc1, *fc2)))


def moe_experts_cpu(x, expert_idx, gate, fc1, fc2, activation):
    if not (all_tensors(*fc1, *fc2) and _float32(x, fc1, fc2)):
        return moe_experts_reference(x, expert_idx, gate, fc1, fc2, activation)
    order, inverse, counts = sort_by_expert(expert_idx, len(fc1))
    xs = PermuteRows.apply(x, order, inverse)
    per_thread = build.available() and experts_per_thread([c for c in counts if c], torch.get_num_threads())
    if not per_thread and x.shape[0] * x.shape[1] * fc1[0].shape[0] < MIN_MACS:
        out = experts_on_sorted(xs, counts, fc1, fc2, activation)
    else:
        weights = [w.contiguous() for w in (*fc1, *fc2)]
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights))  # (inside the
        # Function, needs_input_grad says True under no_grad too)
        out = _GroupedMLP.apply(xs.contiguous(), counts, activation, training, per_thread, *weights)
    return PermuteRows.apply(out, inverse, order) * gate.to(out.dtype)


registry.register("moe_experts", "cpu", moe_experts_cpu, mkl.available, devices=("cpu",))
