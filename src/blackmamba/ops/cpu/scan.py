"""The ``cpu`` backend of ops ``scan`` and ``scan_step`` (csrc/scan_forward.cpp, scan_backward.cpp, step.cpp).

The forward saves the state every ``bm_scan_chunk()`` steps; the backward recomputes each chunk from it and
runs the adjoint recurrence backwards. Channels are vectorised; x and z may be float32 or bfloat16 (other
floating types are computed in float32), delta float32 or bfloat16; the scan accumulates in float32 (float64
when x is float64, which is what makes ``gradcheck`` meaningful). Up to 64 states per channel (Mamba uses 16);
more run the reference.
"""

from __future__ import annotations

import ctypes

import torch

from .. import registry
from ..scan import selective_scan_reference, selective_scan_step_reference
from .build import DTYPE_CODE, ScanTensors, available, grad_needed, library, ptr, threads_for
from .replay import launch


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t.to(dtype)`` (differentiable), skipping the call when nothing changes: the scan wrapper's casts
    are most of its Python time on a 1 ms call."""
    return t if t is None or t.dtype is dtype else t.to(dtype)


def _kernel_dtypes(x, delta, A, B, C, D, z, initial_state):
    """Cast the inputs to what the kernels take (differentiable casts; no-ops when already right)."""
    S = torch.float64 if x.dtype is torch.float64 else torch.float32
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float64):
        x = x.float()
    if x.dtype is not torch.bfloat16 or delta.dtype not in (torch.float32, torch.bfloat16):
        delta = _as(delta, S)  # compiled pairs: fp32/fp32, bf16/fp32, bf16/bf16, fp64/fp64
    z = _as(z, x.dtype)
    A, B, C, D, initial_state = _as(A, S), _as(B, S), _as(C, S), _as(D, S), _as(initial_state, S)
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    initial_state = initial_state.contiguous() if initial_state is not None else None

    def unit_last(t):  # the kernels take any batch / time strides, but unit stride along the last dim
        return t if t is None or t.stride(-1) == 1 else t.contiguous()

    return tuple(unit_last(t) for t in (x, delta, A, B, C, D, z, initial_state))


def _describe(x, delta, A, B, C, D, z, initial_state) -> ScanTensors:
    (b, l, d), n = x.shape, A.shape[1]
    xs, ds, Bs, Cs = x.stride(), delta.stride(), B.stride(), C.stride()
    zs = z.stride() if z is not None else (0, 0)
    return ScanTensors(ptr(x), ptr(delta), ptr(z), ptr(B), ptr(C), ptr(A), ptr(D), ptr(initial_state),
                    xs[0], xs[1], ds[0], ds[1], zs[0], zs[1], Bs[0], Bs[1], Cs[0], Cs[1], b, l, d, n,
                    DTYPE_CODE[x.dtype], DTYPE_CODE[delta.dtype])


def _blocks(A: torch.Tensor, d: int) -> tuple[int, int]:
    """(lanes per vector, channel blocks) for compute dtype A.dtype."""
    lanes = library().bm_vector_bytes() // A.element_size()
    return lanes, -(-d // lanes)


def scan_forward(x, delta, A, B, C, D, z, initial_state, save_checkpoints: bool):
    """Kernel call on prepared inputs: (y (b, l, d) x.dtype, final state (b, d, n), checkpoints or None)."""
    lib = library()
    b, l, d = x.shape
    n = A.shape[1]
    lanes, nblk = _blocks(A, d)
    y = torch.empty(b, l, d, dtype=x.dtype)
    final = torch.empty(b, d, n, dtype=A.dtype)
    ckpt = None
    if save_checkpoints:
        ckpt = torch.empty(b, -(-l // lib.bm_scan_chunk()), nblk, n, lanes, dtype=A.dtype)
    desc = _describe(x, delta, A, B, C, D, z, initial_state)
    threads = threads_for(b * l * d * n)
    ranges = lib.bm_scan_ranges(b, d, A.element_size(), threads, 1)
    rc = launch(lib.bm_scan_forward, ctypes.byref(desc), ptr(y), ptr(final), ptr(ckpt), ranges, threads)
    if rc:
        raise RuntimeError(f"blackmamba cpu scan: unsupported inputs (code {rc})")
    return y, final, ckpt


def scan_backward(x, delta, A, B, C, D, z, ckpt, dy, dfinal):
    """Gradients (dx, ddelta, dA, dB, dC, dD, dz, dinitial_state) for prepared inputs."""
    lib = library()
    b, l, d = x.shape
    n = A.shape[1]
    threads = threads_for(b * l * d * n)
    ranges = lib.bm_scan_ranges(b, d, A.element_size(), threads, 0)
    S = A.dtype
    dx = torch.empty(b, l, d, dtype=x.dtype)
    ddelta = torch.empty(b, l, d, dtype=delta.dtype)
    dz = torch.empty(b, l, d, dtype=x.dtype) if z is not None else None
    dA = torch.empty(b, d, n, dtype=S)
    dD = torch.empty(b, d, dtype=S) if D is not None else None
    dB = torch.empty(ranges, b, l, n, dtype=S)  # partial sums per range of channels
    dC = torch.empty(ranges, b, l, n, dtype=S)
    dinit = torch.empty(b, d, n, dtype=S)
    desc = _describe(x, delta, A, B, C, D, z, None)
    rc = launch(lib.bm_scan_backward, ctypes.byref(desc), ptr(ckpt), ptr(dy), ptr(dfinal), ptr(dx), ptr(ddelta),
                ptr(dz), ptr(dA), ptr(dD), ptr(dB), ptr(dC), ptr(dinit), ranges, threads)
    if rc:
        raise RuntimeError(f"blackmamba cpu scan backward: unsupported inputs (code {rc})")
    return (dx, ddelta, dA.sum(0), dB.sum(0), dC.sum(0), dD.sum(0) if dD is not None else None, dz, dinit)


class _ScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, z, initial_state):
        y, final, ckpt = scan_forward(x, delta, A, B, C, D, z, initial_state, True)
        ctx.save_for_backward(x, delta, A, B, C, D, z, ckpt)
        ctx.has_initial_state = initial_state is not None
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dfinal):
        x, delta, A, B, C, D, z, ckpt = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else dy.to(x.dtype).contiguous()
        dfinal = None if dfinal is None else dfinal.to(A.dtype).contiguous()
        dx, ddelta, dA, dB, dC, dD, dz, dinit = scan_backward(x, delta, A, B, C, D, z, ckpt, dy, dfinal)
        return dx, ddelta, dA, dB, dC, dD, dz, (dinit if ctx.has_initial_state else None)


def selective_scan_cpu(x, delta, A, B, C, D=None, z=None, initial_state=None):
    """The ``cpu`` backend of ``selective_scan`` (same contract as ``selective_scan_reference``)."""
    if A.shape[1] > library().bm_scan_max_state():
        return selective_scan_reference(x, delta, A, B, C, D, z, initial_state)
    args = _kernel_dtypes(x, delta, A, B, C, D, z, initial_state)
    if grad_needed(*args):
        y, final = _ScanFunction.apply(*args)
    else:
        y, final, _ = scan_forward(*args, False)
    return y.to(x.dtype), final



def selective_scan_step_cpu(x, delta, A, B, C, D, z, state):
    """The ``cpu`` backend of ``selective_scan_step``: one fused pass over the (b, d, n) state."""
    if grad_needed(x, delta, A, B, C, D, z) or state.dtype != torch.float32 or not state.is_contiguous():
        return selective_scan_step_reference(x, delta, A, B, C, D, z, state)
    b, d = x.shape
    f32 = [None if t is None else t.float().contiguous() for t in (x, delta, A, B, C, D, z)]
    y = torch.empty(b, d, dtype=torch.float32)
    launch(library().bm_ssm_step, *(ptr(t) for t in f32), ptr(state), ptr(y), b, d, A.shape[1],
           threads_for(b * d * A.shape[1]))
    return y.to(x.dtype)


registry.register("scan", "cpu", selective_scan_cpu, available, devices=("cpu",))
registry.register("scan_step", "cpu", selective_scan_step_cpu, available, devices=("cpu",))
