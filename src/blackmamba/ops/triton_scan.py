"""Selective scan in Triton: forward and backward, with initial and final state (backend ``triton``).

Same contract as ``ops.scan.selective_scan`` (see its docstring): x, delta, z (b, l, d); A (d, n);
B, C (b, l, n); D (d,); initial_state (b, d, n) → y (b, l, d) in x's dtype, final state (b, d, n) fp32.
Inputs may be fp32, bf16 or fp16 (each its own dtype) and strided (x, z and B, C are usually column
slices of a projection's output); every sum runs in fp32.

How the work is laid out
------------------------
One program owns one sequence and a block of ``BLOCK_D`` channels, and walks the sequence in chunks of
``CHUNK`` steps, carrying the (BLOCK_D, n) state in registers from chunk to chunk. Inside a chunk the
recurrence s_t = a_t·s_{t-1} + u_t (a_t = exp(delta_t·A), u_t = delta_t·x_t·B_t) is solved for all CHUNK
steps at once with a parallel associative scan over the (CHUNK, BLOCK_D, n) tile, using the composition
(a1, u1) ∘ (a2, u2) = (a1·a2, a2·u1 + u2). So each chunk is loaded as wide (CHUNK, BLOCK_D) tiles (lots
of memory requests in flight, no per-step latency chain), and the whole sequence is read exactly once.
We chose this over splitting the sequence across programs (a second pass to pass states between
chunks): that needs every input read twice, while here the only cost of the sequential walk is that the
grid is b·d/BLOCK_D programs — 1024 for the benchmark shape (b=8, d=2048), plenty for one GPU
(at batch 1, d=2304 gives 144 programs: about one per SM of an H100).

Backward
--------
The forward (when a gradient is needed) also stores the state at the start of every chunk,
(b, n_chunks, d, n) fp32 — 1/CHUNK of a state per step. The backward walks the chunks in reverse: it
rebuilds the chunk's states from the stored one with the same forward scan, then solves the adjoint
recurrence g_t = C_t·dy'_t + a_{t+1}·g_{t+1} with a reverse associative scan (a_{t+1} is the forward
decay tile shifted by one step, with ``tl.gather``, so no exponential is computed twice), carrying
g across chunks like the forward carries s. With a_t·s_{t-1} = s_t - u_t it then has every gradient:

    dx_t = delta_t·Σ_n g_t·B_t + D·dy'_t          dB_t = Σ_d g_t·delta_t·x_t   dC_t = Σ_d dy'_t·s_t
    ddelta_t = Σ_n g_t·(A·(s_t - u_t) + B_t·x_t)  dA = Σ_{b,t} g_t·delta_t·(s_t - u_t)
    dD = Σ_{b,t} dy'_t·x_t      d initial_state = a_0·g_0      (dy' = dy·silu(z): the gradient of y before the gate)

dB and dC sum over channel blocks with fp32 atomic adds (the order of those adds is not fixed, so
their last bits can vary run to run, as in mamba_ssm's CUDA kernel); dA and dD are summed per sequence
by each program and over the batch with torch.

Cost model: the exponentials, not the arithmetic, compete with memory — exp(delta·A) is one exp2 per
(step, channel, state) in the forward and once more in the backward (the same count as mamba_ssm),
against about 22 bytes per (step, channel) moved in bf16 fwd+bwd. The block sizes below are chosen
on paper (registers per thread, row widths), not tuned on a GPU: none was available to this work.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

CHUNK = 32  # steps per chunk (the scan tile's length; also the state-checkpoint interval)
BLOCK_D = 16  # channels per forward program: a (32, 16, 16) fp32 tile is 64 registers a thread per 4 warps
BLOCK_D_BWD = 8  # the backward holds about twice as many tiles live
NUM_WARPS = 8


@triton.jit
def _compose(a1, u1, a2, u2):
    # apply step 1 then step 2:  s -> a2·(a1·s + u1) + u2
    return a1 * a2, a2 * u1 + u2


@triton.jit
def _scan_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, h0_ptr,
    y_ptr, hT_ptr, ck_ptr,
    L, DIM, N, n_chunks,
    sx_b, sx_l, sx_d, sdt_b, sdt_l, sdt_d, sz_b, sz_l, sz_d,
    sB_b, sB_l, sB_n, sC_b, sC_l, sC_n, sA_d, sA_n,
    sy_b, sy_l, sy_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, SAVE_CK: tl.constexpr,
    T: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)  # (BD,)
    offs_n = tl.arange(0, BN)  # (BN,)
    offs_t = tl.arange(0, T)  # (T,)
    mask_d = offs_d < DIM
    mask_dn = mask_d[:, None] & (offs_n[None, :] < N)  # (BD, BN)
    # A·log2(e), so that exp(delta·A) is one exp2
    A2 = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mask_dn, other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # (BD,)
    state_off = (pid_b * DIM + offs_d[:, None]) * N + offs_n[None, :]  # (BD, BN) into contiguous (b, d, n)
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=mask_dn, other=0.0).to(tl.float32)  # (BD, BN)
    else:
        h = tl.zeros((BD, BN), dtype=tl.float32)
    for c in range(0, n_chunks):
        t = c * T + offs_t  # (T,)
        mask_t = t < L
        m_td = mask_t[:, None] & mask_d[None, :]  # (T, BD)
        m_tn = mask_t[:, None] & (offs_n[None, :] < N)  # (T, BN)
        if SAVE_CK:
            ck_off = ((pid_b * n_chunks + c) * DIM + offs_d[:, None]) * N + offs_n[None, :]
            tl.store(ck_ptr + ck_off, h, mask=mask_dn)
        x = tl.load(x_ptr + pid_b * sx_b + t[:, None] * sx_l + offs_d[None, :] * sx_d, mask=m_td, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + pid_b * sdt_b + t[:, None] * sdt_l + offs_d[None, :] * sdt_d, mask=m_td, other=0.0).to(tl.float32)
        Bm = tl.load(B_ptr + pid_b * sB_b + t[:, None] * sB_l + offs_n[None, :] * sB_n, mask=m_tn, other=0.0).to(tl.float32)
        Cm = tl.load(C_ptr + pid_b * sC_b + t[:, None] * sC_l + offs_n[None, :] * sC_n, mask=m_tn, other=0.0).to(tl.float32)
        # masked steps have delta = 0, x = 0: decay 1, input 0, so the state passes through unchanged
        a = tl.exp2(dt[:, :, None] * A2[None, :, :])  # (T, BD, BN)
        u = (dt * x)[:, :, None] * Bm[:, None, :]  # (T, BD, BN)
        P, S = tl.associative_scan((a, u), 0, _compose)  # states from a zero start, and decay products
        s = S + P * h[None, :, :]  # (T, BD, BN): the true states
        y = tl.sum(s * Cm[:, None, :], axis=2)  # (T, BD)
        if HAS_D:
            y += Dv[None, :] * x
        if HAS_Z:
            z = tl.load(z_ptr + pid_b * sz_b + t[:, None] * sz_l + offs_d[None, :] * sz_d, mask=m_td, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(y_ptr + pid_b * sy_b + t[:, None] * sy_l + offs_d[None, :] * sy_d,
                 y.to(y_ptr.dtype.element_ty), mask=m_td)
        h = tl.sum(tl.where(offs_t[:, None, None] == T - 1, s, 0.0), axis=0)  # the chunk's last state
    tl.store(hT_ptr + state_off, h, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dy_ptr, dhT_ptr, ck_ptr,
    dx_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dh0_ptr,
    L, DIM, N, n_chunks,
    sx_b, sx_l, sx_d, sdt_b, sdt_l, sdt_d, sz_b, sz_l, sz_d,
    sB_b, sB_l, sB_n, sC_b, sC_l, sC_n, sA_d, sA_n,
    sdy_b, sdy_l, sdy_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DHT: tl.constexpr, HAS_H0: tl.constexpr,
    T: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    offs_t = tl.arange(0, T)
    mask_d = offs_d < DIM
    mask_dn = mask_d[:, None] & (offs_n[None, :] < N)
    A = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_off = (pid_b * DIM + offs_d[:, None]) * N + offs_n[None, :]
    if HAS_DHT:
        g_next = tl.load(dhT_ptr + state_off, mask=mask_dn, other=0.0).to(tl.float32)  # adjoint entering from the right
    else:
        g_next = tl.zeros((BD, BN), dtype=tl.float32)
    a_first_next = tl.full((BD, BN), 1.0, dtype=tl.float32)  # decay of the step after this chunk (1 past the end)
    dA_acc = tl.zeros((BD, BN), dtype=tl.float32)
    dD_acc = tl.zeros((BD,), dtype=tl.float32)
    shift = tl.minimum(offs_t[:, None, None] + 1, T - 1) + tl.zeros((T, BD, BN), dtype=tl.int32)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t = c * T + offs_t
        mask_t = t < L
        m_td = mask_t[:, None] & mask_d[None, :]
        m_tn = mask_t[:, None] & (offs_n[None, :] < N)
        x = tl.load(x_ptr + pid_b * sx_b + t[:, None] * sx_l + offs_d[None, :] * sx_d, mask=m_td, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + pid_b * sdt_b + t[:, None] * sdt_l + offs_d[None, :] * sdt_d, mask=m_td, other=0.0).to(tl.float32)
        Bm = tl.load(B_ptr + pid_b * sB_b + t[:, None] * sB_l + offs_n[None, :] * sB_n, mask=m_tn, other=0.0).to(tl.float32)
        Cm = tl.load(C_ptr + pid_b * sC_b + t[:, None] * sC_l + offs_n[None, :] * sC_n, mask=m_tn, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + pid_b * sdy_b + t[:, None] * sdy_l + offs_d[None, :] * sdy_d, mask=m_td, other=0.0).to(tl.float32)
        h0 = tl.load(ck_ptr + ((pid_b * n_chunks + c) * DIM + offs_d[:, None]) * N + offs_n[None, :], mask=mask_dn, other=0.0)
        # rebuild the chunk's states (as the forward did)
        a = tl.exp2(dt[:, :, None] * A2[None, :, :])  # (T, BD, BN)
        dtx = dt * x  # (T, BD)
        u = dtx[:, :, None] * Bm[:, None, :]
        P, S = tl.associative_scan((a, u), 0, _compose)
        s = S + P * h0[None, :, :]
        td = (pid_b * L + t[:, None]) * DIM + offs_d[None, :]  # into contiguous (b, l, d) gradients
        # gradient of y before the gate (dy') and of the gate input z
        dyp = dy
        if HAS_Z:
            z = tl.load(z_ptr + pid_b * sz_b + t[:, None] * sz_l + offs_d[None, :] * sz_d, mask=m_td, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            y_pre = tl.sum(s * Cm[:, None, :], axis=2)
            if HAS_D:
                y_pre += Dv[None, :] * x
            dz = dy * y_pre * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + td, dz.to(dz_ptr.dtype.element_ty), mask=m_td)
            dyp = dy * z * sig
        # adjoint: g_t = C_t·dy'_t + a_{t+1}·g_{t+1}, a reverse scan with the decays shifted by one step
        a_next = tl.gather(a, shift, 0)
        a_next = tl.where(offs_t[:, None, None] == T - 1, a_first_next[None, :, :], a_next)
        cvec = dyp[:, :, None] * Cm[:, None, :]  # (T, BD, BN)
        Q, G = tl.associative_scan((a_next, cvec), 0, _compose, reverse=True)
        g = G + Q * g_next[None, :, :]  # (T, BD, BN)
        # gradients of this chunk
        gB = tl.sum(g * Bm[:, None, :], axis=2)  # (T, BD)
        dx = dt * gB
        if HAS_D:
            dx += Dv[None, :] * dyp
            dD_acc += tl.sum(dyp * x, axis=0)
        prev = s - u  # a_t·s_{t-1}
        ddt = tl.sum(g * prev * A[None, :, :], axis=2) + gB * x
        dA_acc += tl.sum(g * prev * dt[:, :, None], axis=0)
        tl.store(dx_ptr + td, dx.to(dx_ptr.dtype.element_ty), mask=m_td)
        tl.store(ddt_ptr + td, ddt.to(ddt_ptr.dtype.element_ty), mask=m_td)
        tn = (pid_b * L + t[:, None]) * N + offs_n[None, :]  # into contiguous (b, l, n) fp32 sums
        tl.atomic_add(dB_ptr + tn, tl.sum(g * dtx[:, :, None], axis=1), mask=m_tn)
        tl.atomic_add(dC_ptr + tn, tl.sum(s * dyp[:, :, None], axis=1), mask=m_tn)
        # carry to the chunk before: its last step sees this chunk's first decay and adjoint
        first = offs_t[:, None, None] == 0
        a_first_next = tl.sum(tl.where(first, a, 0.0), axis=0)
        g_next = tl.sum(tl.where(first, g, 0.0), axis=0)
    tl.store(dA_ptr + state_off, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * DIM + offs_d, dD_acc, mask=mask_d)
    if HAS_H0:
        tl.store(dh0_ptr + state_off, a_first_next * g_next, mask=mask_dn)




def _launch_ctx(t: torch.Tensor):
    # Triton launches on the current CUDA device; CPU tensors only occur under TRITON_INTERPRET=1
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def scan_forward(x, delta, A, B, C, D, z, initial_state, save_checkpoints: bool):
    """Launch the forward kernel → (y (b, l, d), final state (b, d, n) fp32, checkpoints or None)."""
    b, l, d = x.shape
    n = A.shape[1]
    n_chunks = triton.cdiv(l, CHUNK)
    y = torch.empty((b, l, d), dtype=x.dtype, device=x.device)
    hT = torch.empty((b, d, n), dtype=torch.float32, device=x.device)
    ck = torch.empty((b, n_chunks, d, n), dtype=torch.float32, device=x.device) if save_checkpoints else None
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    zz = z if z is not None else x  # any tensor with x's strides when there is no gate
    with _launch_ctx(x):
        _scan_fwd_kernel[(b, triton.cdiv(d, BLOCK_D))](
            x, delta, A, B, C, D if D is not None else A, zz, h0 if h0 is not None else hT,
            y, hT, ck if ck is not None else hT,
            l, d, n, n_chunks,
            *x.stride(), *delta.stride(), *zz.stride(), *B.stride(), *C.stride(), *A.stride(), *y.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=h0 is not None, SAVE_CK=save_checkpoints,
            T=CHUNK, BD=BLOCK_D, BN=triton.next_power_of_2(n), num_warps=NUM_WARPS,
        )
    return y, hT, ck


def scan_backward(x, delta, A, B, C, D, z, has_initial_state: bool, ck, dy, dhT):
    """Launch the backward kernel → (dx, ddelta, dA, dB, dC, dD, dz, d initial_state); unused ones None."""
    b, l, d = x.shape
    n = A.shape[1]
    n_chunks = ck.shape[1]
    dev = x.device
    if dy is None:
        dy = torch.zeros((b, l, d), dtype=x.dtype, device=dev)
    dx = torch.empty((b, l, d), dtype=x.dtype, device=dev)
    ddt = torch.empty((b, l, d), dtype=delta.dtype, device=dev)
    dz = torch.empty((b, l, d), dtype=z.dtype, device=dev) if z is not None else None
    dB = torch.zeros((b, l, n), dtype=torch.float32, device=dev)
    dC = torch.zeros((b, l, n), dtype=torch.float32, device=dev)
    dA = torch.empty((b, d, n), dtype=torch.float32, device=dev)
    dD = torch.empty((b, d), dtype=torch.float32, device=dev) if D is not None else None
    dh0 = torch.empty((b, d, n), dtype=torch.float32, device=dev) if has_initial_state else None
    dhT_c = dhT.float().contiguous() if dhT is not None else None
    zz = z if z is not None else x
    with _launch_ctx(x):
        _scan_bwd_kernel[(b, triton.cdiv(d, BLOCK_D_BWD))](
            x, delta, A, B, C, D if D is not None else A, zz, dy, dhT_c if dhT_c is not None else dA, ck,
            dx, ddt, dz if dz is not None else dx, dB, dC, dA, dD if dD is not None else dA,
            dh0 if dh0 is not None else dA,
            l, d, n, n_chunks,
            *x.stride(), *delta.stride(), *zz.stride(), *B.stride(), *C.stride(), *A.stride(), *dy.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_DHT=dhT_c is not None, HAS_H0=has_initial_state,
            T=CHUNK, BD=BLOCK_D_BWD, BN=triton.next_power_of_2(n), num_warps=NUM_WARPS,
        )
    return (dx, ddt, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.sum(0).to(D.dtype) if D is not None else None, dz, dh0)


class SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, z, initial_state):
        need_grad = any(ctx.needs_input_grad)
        y, hT, ck = scan_forward(x, delta, A, B, C, D, z, initial_state, save_checkpoints=need_grad)
        if need_grad:
            ctx.save_for_backward(x, delta, A, B, C, D, z, ck)
            ctx.has_initial_state = initial_state is not None
            ctx.initial_dtype = initial_state.dtype if initial_state is not None else None
        ctx.set_materialize_grads(False)
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        x, delta, A, B, C, D, z, ck = ctx.saved_tensors
        dx, ddt, dA, dB, dC, dD, dz, dh0 = scan_backward(x, delta, A, B, C, D, z, ctx.has_initial_state, ck, dy, dhT)
        if dh0 is not None:
            dh0 = dh0.to(ctx.initial_dtype)
        return dx, ddt, dA, dB, dC, dD, dz, dh0


def selective_scan_triton(x, delta, A, B, C, D=None, z=None, initial_state=None):
    """The ``triton`` backend of ``selective_scan`` (differentiable in every tensor argument)."""
    return SelectiveScanTriton.apply(x, delta, A, B, C, D, z, initial_state)
