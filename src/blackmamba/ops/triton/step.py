"""Single-token decode kernels in Triton: the conv update and the SSM state update, and op ``mamba_step`` made of them.

A decode step of the Mamba mixer is   in_proj → conv update → silu → x_proj → dt_proj → SSM update → out_proj.
The matmuls stay with cuBLAS; the two elementwise stages between them are one kernel each, updating
their state in place (so a CUDA graph can replay them over a preallocated state):

- ``conv_update``: window = [state, x], y = silu(bias + Σ_k w_k·window_k), state ← window[1:]
  (``ops.conv.causal_conv1d_step`` followed by silu);
- ``ssm_update``:  delta = softplus(dt + dt_bias) (optional), s ← exp(delta·A)·s + delta·x·B,
  y = (⟨s, C⟩ + D·x)·silu(z)  (``ops.scan.selective_scan_step`` with the step size computed inside).

Shapes: x, z, dt (b, d); B, C (b, n); A (d, n); D, dt_bias, bias (d,); conv weight (d, K);
conv state (b, d, K-1) in the model dtype; SSM state (b, d, n) fp32. Inputs may be strided views.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_D = 64  # channels per program (the grid is batch × d/BLOCK_D)


@triton.jit
def _softplus(v):
    # softplus(v) = max(v, 0) + log1p(exp(-|v|)), with log1p's small-argument series; torch returns v above 20
    e = tl.exp(-tl.abs(v))
    log1p = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + log1p)


@triton.jit
def _ssm_update_kernel(
    s_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, y_ptr,
    DIM, N,
    ss_b, ss_d, ss_n, sx_b, sx_d, sdt_b, sdt_d, sA_d, sA_n, sB_b, sB_n, sC_b, sC_n, sz_b, sz_d, sy_b, sy_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)  # (BD,)
    offs_n = tl.arange(0, BN)  # (BN,)
    mask_d = offs_d < DIM
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    s_off = pid_b * ss_b + offs_d[:, None] * ss_d + offs_n[None, :] * ss_n  # (BD, BN)
    s = tl.load(s_ptr + s_off, mask=mask_dn, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * sx_b + offs_d * sx_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * sdt_b + offs_d * sdt_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dtb_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mask_dn, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + pid_b * sB_b + offs_n * sB_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b * sC_b + offs_n * sC_n, mask=mask_n, other=0.0).to(tl.float32)
    s = tl.exp(dt[:, None] * A) * s + (dt * x)[:, None] * Bv[None, :]  # (BD, BN)
    tl.store(s_ptr + s_off, s.to(s_ptr.dtype.element_ty), mask=mask_dn)
    y = tl.sum(s * Cv[None, :], axis=1)  # (BD,)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * sz_b + offs_d * sz_d, mask=mask_d, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + pid_b * sy_b + offs_d * sy_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _conv_update_kernel(
    st_ptr, x_ptr, w_ptr, bias_ptr, y_ptr,
    DIM, KM1,
    sst_b, sst_d, sst_k, sx_b, sx_d, sw_d, sw_k, sy_b, sy_d,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)  # (BD,)
    offs_k = tl.arange(0, BK)  # window positions 0..K-1 (BK = next power of 2 of K)
    mask_d = offs_d < DIM
    x = tl.load(x_ptr + pid_b * sx_b + offs_d * sx_d, mask=mask_d, other=0.0)  # (BD,)
    st_row = st_ptr + pid_b * sst_b + offs_d[:, None] * sst_d  # (BD, 1)
    # window = [state_0 .. state_{K-2}, x]
    old = tl.load(st_row + offs_k[None, :] * sst_k, mask=mask_d[:, None] & (offs_k[None, :] < KM1), other=0.0)
    window = tl.where(offs_k[None, :] == KM1, x[:, None].to(tl.float32), old.to(tl.float32))  # (BD, BK)
    w = tl.load(w_ptr + offs_d[:, None] * sw_d + offs_k[None, :] * sw_k,
                mask=mask_d[:, None] & (offs_k[None, :] <= KM1), other=0.0).to(tl.float32)
    y = tl.sum(window * w, axis=1)  # (BD,)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    # shift: state_j ← window_{j+1} (read again from memory, one position further on)
    nxt = tl.load(st_row + (offs_k[None, :] + 1) * sst_k, mask=mask_d[:, None] & (offs_k[None, :] + 1 < KM1), other=0.0)
    nxt = tl.where(offs_k[None, :] == KM1 - 1, x[:, None].to(nxt.dtype), nxt)
    tl.store(st_row + offs_k[None, :] * sst_k, nxt.to(st_ptr.dtype.element_ty),
             mask=mask_d[:, None] & (offs_k[None, :] < KM1))
    tl.store(y_ptr + pid_b * sy_b + offs_d * sy_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def _launch_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def ssm_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, softplus: bool = False):
    """One SSM step for every sequence: updates ``state`` (b, d, n) in place, returns y (b, d) in x's dtype.

    ``dt`` is the step size itself (``softplus=False``), or the pre-activation whose
    ``softplus(dt + dt_bias)`` is the step size (``softplus=True``, as the mixer computes it).
    """
    b, d = x.shape
    n = A.shape[1]
    if state.shape != (b, d, n):
        raise ValueError(f"ssm_update: state must be {(b, d, n)}, got {tuple(state.shape)}")
    y = torch.empty((b, d), dtype=x.dtype, device=x.device)
    zz = z if z is not None else x
    with _launch_ctx(x):
        _ssm_update_kernel[(b, triton.cdiv(d, BLOCK_D))](
            state, x, dt, A, B, C, D if D is not None else x, zz, dt_bias if dt_bias is not None else x, y,
            d, n, *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
            *zz.stride(), *y.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, SOFTPLUS=softplus,
            BD=BLOCK_D, BN=triton.next_power_of_2(n), num_warps=4,
        )
    return y


def conv_update(x, weight, bias, state, silu: bool = True):
    """One conv step: x (b, d) → y (b, d) (silu applied when ``silu``); shifts ``state`` (b, d, K-1) in place."""
    b, d = x.shape
    K = weight.shape[1]
    if state.shape != (b, d, K - 1):
        raise ValueError(f"conv_update: state must be {(b, d, K - 1)}, got {tuple(state.shape)}")
    y = torch.empty((b, d), dtype=x.dtype, device=x.device)
    with _launch_ctx(x):
        _conv_update_kernel[(b, triton.cdiv(d, BLOCK_D))](
            state, x, weight, bias if bias is not None else x, y, d, K - 1,
            *state.stride(), *x.stride(), *weight.stride(), *y.stride(),
            HAS_BIAS=bias is not None, SILU=silu, BD=BLOCK_D, BK=triton.next_power_of_2(K), num_warps=4,
        )
    return y


def mamba_step(h, in_w, conv_w, conv_b, x_w, dt_w, dt_b, A, D, out_w, conv_state, ssm_state):
    """Op ``mamba_step`` (same contract, weights only): the projections with cuBLAS, the conv update (+ silu) and
    the SSM update (+ dt bias, softplus, D, silu(z) gate) one kernel each; nothing read on the
    host, so a CUDA graph can capture it."""
    I, N, R = conv_w.shape[0], A.shape[1], dt_w.shape[1]
    x, z = F.linear(h, in_w).split([I, I], dim=-1)  # (b, I) each
    x = conv_update(x, conv_w, conv_b, conv_state, silu=True)
    dt, B, C = F.linear(x, x_w).split([R, N, N], dim=-1)
    dt = F.linear(dt, dt_w)  # (b, I); bias and softplus inside the kernel, in fp32
    y = ssm_update(ssm_state, x, dt, A, B, C, D, z, dt_bias=dt_b, softplus=True)
    return F.linear(y, out_w)
