"""Selective scan in Triton: forward and backward, with initial and final state (backend ``triton``).

Same contract as ``ops.scan.selective_scan`` (see its docstring): x, delta, z (b, l, d); A (d, n);
B, C (b, l, n); D (d,); initial_state (b, d, n) → y (b, l, d) in x's dtype, final state (b, d, n) fp32.
Inputs may be fp32, bf16 or fp16 (each its own dtype) and strided (x, z and B, C are usually column
slices of a projection's output); every sum runs in fp32.

How the work is laid out
------------------------
One program owns one sequence and a block of ``BD`` channels, and walks the sequence in chunks of
``CHUNK`` steps, carrying the (BD, n) state in registers from chunk to chunk. Inside a chunk, for each
state index in turn, the recurrence s_t = a_t·s_{t-1} + u_t (a_t = exp(delta_t·A), u_t = delta_t·x_t·B_t)
is solved for all CHUNK steps at once by an associative scan over the (CHUNK, BD) tile, with the
composition (a1, u1) ∘ (a2, u2) = (a1·a2, a2·u1 + u2), and y accumulates Σ_n s·C. So the inputs are read
exactly once, as wide (CHUNK, BD) tiles (many memory requests in flight, no per-step latency chain).

Why these choices:
- Sequential over chunks, not the sequence split across programs: splitting needs a second pass to
  pass states between chunks and reads every input twice. The grid is b·d/BD programs (1024 for the
  benchmark shape, b=8, d=2048, BD=16); for small batches BD shrinks so the grid still fills the GPU.
- The next chunk's inputs are loaded while the current one is scanned (Triton's software pipelining
  does not apply to this loop), so memory traffic overlaps the exponentials and scans.
- One state index at a time, not a (CHUNK, BD, n) tile: a step's inputs would expand n-fold in
  registers (compiled for sm_90 that took 128-148 registers a thread in the forward and spilled at 255
  in the backward: one block per SM, too few bytes in flight); see ``block_d`` for the counts now. Looping over n keeps 2-D tiles, as
  mamba_ssm's CUDA kernel does; the same exponentials are computed either way.

Backward
--------
The forward (when a gradient is needed) also stores the state at the start of every chunk,
(b, n_chunks, d, n) fp32 — 1/CHUNK of a state per step. The backward walks the chunks in reverse: it
rebuilds the chunk's states from the stored one with the same forward scan, then solves the adjoint
recurrence g_t = C_t·dy'_t + a_{t+1}·g_{t+1} with a reverse associative scan (a_{t+1} is the forward
decay tile shifted by one step with ``tl.gather``, so no exponential is computed twice), carrying g
across chunks like the forward carries s. With a_t·s_{t-1} = s_t - u_t it then has every gradient:

    dx_t = delta_t·Σ_n g_t·B_t + D·dy'_t          dB_t = Σ_d g_t·delta_t·x_t   dC_t = Σ_d dy'_t·s_t
    ddelta_t = Σ_n g_t·(A·(s_t - u_t) + B_t·x_t)  dA = Σ_{b,t} g_t·delta_t·(s_t - u_t)
    dD = Σ_{b,t} dy'_t·x_t      d initial_state = a_0·g_0      (dy' = dy·silu(z): the gradient of y before the gate)

dB and dC sum over channel blocks with fp32 atomic adds (the order of those adds is not fixed, so
their last bits can vary run to run, as in mamba_ssm's CUDA kernel); dA and dD are summed per sequence
by each program and over the batch with torch.

Block sizes were checked by compiling for sm_90 (registers, spills) but not timed: no GPU was
available to this work.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

CHUNK = 32  # steps per chunk (the scan tile's length; also the state-checkpoint interval)
NUM_WARPS = 4


@triton.jit
def _compose(a1, u1, a2, u2):
    # apply step 1 then step 2:  s -> a2·(a1·s + u1) + u2
    return a1 * a2, a2 * u1 + u2


@triton.jit
def _load_td(ptr, pid_b, t, offs_d, s_b, s_l, s_d, L, DIM):
    # the (T, BD) tile of a (b, l, d) tensor at steps t, in its own dtype; zeros outside [0, L) × [0, DIM)
    mask = (t[:, None] >= 0) & (t[:, None] < L) & (offs_d[None, :] < DIM)
    return tl.load(ptr + pid_b * s_b + t[:, None] * s_l + offs_d[None, :] * s_d, mask=mask, other=0.0)


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
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # (BD,)
    state_off = (pid_b * DIM + offs_d[:, None]) * N + offs_n[None, :]  # (BD, BN) into contiguous (b, d, n)
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=mask_dn, other=0.0).to(tl.float32)  # (BD, BN)
    else:
        h = tl.zeros((BD, BN), dtype=tl.float32)
    last_row = offs_t[:, None] == T - 1  # (T, 1)
    # x and delta of the next chunk are loaded one chunk ahead, so the loads overlap the scans
    x_next = _load_td(x_ptr, pid_b, offs_t, offs_d, sx_b, sx_l, sx_d, L, DIM)
    dt_next = _load_td(dt_ptr, pid_b, offs_t, offs_d, sdt_b, sdt_l, sdt_d, L, DIM)
    for c in range(0, n_chunks):
        t = c * T + offs_t  # (T,)
        mask_t = t < L
        m_td = mask_t[:, None] & mask_d[None, :]  # (T, BD)
        if SAVE_CK:
            tl.store(ck_ptr + ((pid_b * n_chunks + c) * DIM + offs_d[:, None]) * N + offs_n[None, :], h, mask=mask_dn)
        # masked steps have delta = 0 and x = 0: decay 1, input 0, so the state passes through unchanged
        x = x_next.to(tl.float32)
        dt = dt_next.to(tl.float32)
        x_next = _load_td(x_ptr, pid_b, t + T, offs_d, sx_b, sx_l, sx_d, L, DIM)
        dt_next = _load_td(dt_ptr, pid_b, t + T, offs_d, sdt_b, sdt_l, sdt_d, L, DIM)
        if HAS_Z:
            z = _load_td(z_ptr, pid_b, t, offs_d, sz_b, sz_l, sz_d, L, DIM).to(tl.float32)  # used after the loop
        dtx = dt * x  # (T, BD)
        y = tl.zeros((T, BD), dtype=tl.float32)
        for n in range(0, N):
            col_n = offs_n[None, :] == n  # (1, BN): column n of the (BD, BN) state tiles
            A2 = tl.load(A_ptr + offs_d * sA_d + n * sA_n, mask=mask_d, other=0.0).to(tl.float32) * 1.4426950408889634
            Bn = tl.load(B_ptr + pid_b * sB_b + t * sB_l + n * sB_n, mask=mask_t, other=0.0).to(tl.float32)  # (T,)
            Cn = tl.load(C_ptr + pid_b * sC_b + t * sC_l + n * sC_n, mask=mask_t, other=0.0).to(tl.float32)
            a = tl.exp2(dt * A2[None, :])  # (T, BD): exp(delta·A)
            P, S = tl.associative_scan((a, dtx * Bn[:, None]), 0, _compose)  # decay products; states from 0
            s = S + P * tl.sum(tl.where(col_n, h, 0.0), axis=1)[None, :]  # (T, BD): the true states for this n
            y += s * Cn[:, None]
            h = tl.where(col_n, tl.sum(tl.where(last_row, s, 0.0), axis=0)[:, None], h)  # the chunk's last state
        if HAS_D:
            y += Dv[None, :] * x
        if HAS_Z:
            y *= z * tl.sigmoid(z)
        tl.store(y_ptr + pid_b * sy_b + t[:, None] * sy_l + offs_d[None, :] * sy_d,
                 y.to(y_ptr.dtype.element_ty), mask=m_td)
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
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_off = (pid_b * DIM + offs_d[:, None]) * N + offs_n[None, :]
    if HAS_DHT:
        g_next = tl.load(dhT_ptr + state_off, mask=mask_dn, other=0.0).to(tl.float32)  # adjoint entering from the right
    else:
        g_next = tl.zeros((BD, BN), dtype=tl.float32)
    a_next0 = tl.full((BD, BN), 1.0, dtype=tl.float32)  # decay of the step after this chunk (1 past the end)
    dA_acc = tl.zeros((BD, BN), dtype=tl.float32)
    dD_acc = tl.zeros((BD,), dtype=tl.float32)
    shift = tl.minimum(offs_t[:, None] + 1, T - 1) + tl.zeros((T, BD), dtype=tl.int32)  # row t -> row t+1
    last_row = offs_t[:, None] == T - 1
    first_row = offs_t[:, None] == 0
    # the inputs of the chunk before (processed next) are loaded one chunk ahead
    t_last = (n_chunks - 1) * T + offs_t
    x_next = _load_td(x_ptr, pid_b, t_last, offs_d, sx_b, sx_l, sx_d, L, DIM)
    dt_next = _load_td(dt_ptr, pid_b, t_last, offs_d, sdt_b, sdt_l, sdt_d, L, DIM)
    dy_next = _load_td(dy_ptr, pid_b, t_last, offs_d, sdy_b, sdy_l, sdy_d, L, DIM)
    if HAS_Z:
        z_next = _load_td(z_ptr, pid_b, t_last, offs_d, sz_b, sz_l, sz_d, L, DIM)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t = c * T + offs_t
        mask_t = t < L
        m_td = mask_t[:, None] & mask_d[None, :]
        h0 = tl.load(ck_ptr + ((pid_b * n_chunks + c) * DIM + offs_d[:, None]) * N + offs_n[None, :], mask=mask_dn, other=0.0)
        x = x_next.to(tl.float32)
        dt = dt_next.to(tl.float32)
        dy = dy_next.to(tl.float32)
        dyp = dy  # the gradient of y before the gate
        if HAS_Z:
            z = z_next.to(tl.float32)
            sig = tl.sigmoid(z)
            dyp = dy * z * sig
        t_prev = t - T  # negative on the first chunk: masked off
        x_next = _load_td(x_ptr, pid_b, t_prev, offs_d, sx_b, sx_l, sx_d, L, DIM)
        dt_next = _load_td(dt_ptr, pid_b, t_prev, offs_d, sdt_b, sdt_l, sdt_d, L, DIM)
        dy_next = _load_td(dy_ptr, pid_b, t_prev, offs_d, sdy_b, sdy_l, sdy_d, L, DIM)
        if HAS_Z:
            z_next = _load_td(z_ptr, pid_b, t_prev, offs_d, sz_b, sz_l, sz_d, L, DIM)
        dtx = dt * x
        gB = tl.zeros((T, BD), dtype=tl.float32)  # Σ_n g·B
        ddt = tl.zeros((T, BD), dtype=tl.float32)  # Σ_n g·A·(s - u)
        y_pre = tl.zeros((T, BD), dtype=tl.float32)  # Σ_n s·C, for dz
        tn = (pid_b * L + t) * N  # (T,) rows of the contiguous (b, l, n) fp32 sums
        for n in range(0, N):
            col_n = offs_n[None, :] == n
            A = tl.load(A_ptr + offs_d * sA_d + n * sA_n, mask=mask_d, other=0.0).to(tl.float32)  # (BD,)
            Bn = tl.load(B_ptr + pid_b * sB_b + t * sB_l + n * sB_n, mask=mask_t, other=0.0).to(tl.float32)  # (T,)
            Cn = tl.load(C_ptr + pid_b * sC_b + t * sC_l + n * sC_n, mask=mask_t, other=0.0).to(tl.float32)
            # rebuild the chunk's states for this n (as the forward did)
            a = tl.exp2(dt * (A * 1.4426950408889634)[None, :])  # (T, BD)
            u = dtx * Bn[:, None]
            P, S = tl.associative_scan((a, u), 0, _compose)
            s = S + P * tl.sum(tl.where(col_n, h0, 0.0), axis=1)[None, :]
            y_pre += s * Cn[:, None]
            # adjoint g_t = C_t·dy'_t + a_{t+1}·g_{t+1}: a reverse scan over the decays shifted by one step
            a_next = tl.where(last_row, tl.sum(tl.where(col_n, a_next0, 0.0), axis=1)[None, :], tl.gather(a, shift, 0))
            Q, G = tl.associative_scan((a_next, dyp * Cn[:, None]), 0, _compose, reverse=True)
            g = G + Q * tl.sum(tl.where(col_n, g_next, 0.0), axis=1)[None, :]  # (T, BD)
            prev = s - u  # a_t·s_{t-1}
            gB += g * Bn[:, None]
            ddt += g * prev * A[None, :]
            dA_acc += tl.where(col_n, tl.sum(g * prev * dt, axis=0)[:, None], 0.0)
            tl.atomic_add(dB_ptr + tn + n, tl.sum(g * dtx, axis=1), mask=mask_t, sem="relaxed")
            tl.atomic_add(dC_ptr + tn + n, tl.sum(s * dyp, axis=1), mask=mask_t, sem="relaxed")
            # carry to the chunk before: its last step sees this chunk's first decay and adjoint
            a_next0 = tl.where(col_n, tl.sum(tl.where(first_row, a, 0.0), axis=0)[:, None], a_next0)
            g_next = tl.where(col_n, tl.sum(tl.where(first_row, g, 0.0), axis=0)[:, None], g_next)
        dx = dt * gB
        if HAS_D:
            dx += Dv[None, :] * dyp
            dD_acc += tl.sum(dyp * x, axis=0)
            y_pre += Dv[None, :] * x
        td = (pid_b * L + t[:, None]) * DIM + offs_d[None, :]  # into contiguous (b, l, d) gradients
        tl.store(dx_ptr + td, dx.to(dx_ptr.dtype.element_ty), mask=m_td)
        tl.store(ddt_ptr + td, (ddt + gB * x).to(ddt_ptr.dtype.element_ty), mask=m_td)
        if HAS_Z:
            dz = dy * y_pre * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + td, dz.to(dz_ptr.dtype.element_ty), mask=m_td)
    tl.store(dA_ptr + state_off, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * DIM + offs_d, dD_acc, mask=mask_d)
    if HAS_H0:
        tl.store(dh0_ptr + state_off, a_next0 * g_next, mask=mask_dn)


def block_d(b: int, d: int, device: torch.device, backward: bool) -> int:
    """Channels per program. Compiled for sm_90 (CHUNK=32, 4 warps, specialised as on the released
    models), the forward takes 106 registers a thread at 16 channels (four blocks per SM) and the
    backward 252 at 16 but 146 at 8 (three blocks per SM), so: forward 16 (32-byte bf16 rows), or 8 when
    16 leaves fewer than two programs per SM; backward 8. Timings on a GPU should settle this."""
    if backward:
        return 8
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if b * triton.cdiv(d, 16) < 2 * sms:
            return 8
    return 16


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
        bd = block_d(b, d, x.device, backward=False)
        _scan_fwd_kernel[(b, triton.cdiv(d, bd))](
            x, delta, A, B, C, D if D is not None else A, zz, h0 if h0 is not None else hT,
            y, hT, ck if ck is not None else hT,
            l, d, n, n_chunks,
            *x.stride(), *delta.stride(), *zz.stride(), *B.stride(), *C.stride(), *A.stride(), *y.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=h0 is not None, SAVE_CK=save_checkpoints,
            T=CHUNK, BD=bd, BN=triton.next_power_of_2(n), num_warps=NUM_WARPS,
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
        bd = block_d(b, d, x.device, backward=True)
        _scan_bwd_kernel[(b, triton.cdiv(d, bd))](
            x, delta, A, B, C, D if D is not None else A, zz, dy, dhT_c if dhT_c is not None else dA, ck,
            dx, ddt, dz if dz is not None else dx, dB, dC, dA, dD if dD is not None else dA,
            dh0 if dh0 is not None else dA,
            l, d, n, n_chunks,
            *x.stride(), *delta.stride(), *zz.stride(), *B.stride(), *C.stride(), *A.stride(), *dy.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_DHT=dhT_c is not None, HAS_H0=has_initial_state,
            T=CHUNK, BD=bd, BN=triton.next_power_of_2(n), num_warps=NUM_WARPS,
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
