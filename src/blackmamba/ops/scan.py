"""Selective scan (Mamba-1 SSM recurrence), full sequence and single step.

Contract (every backend):

    y, final_state = selective_scan(x, delta, A, B, C, D=None, z=None, initial_state=None)

    x, delta, z : (b, l, d)   delta is the positive step, softplus(dt_proj(dt) + bias), already applied
    A           : (d, n)      negative real (A = -exp(A_log))
    B, C        : (b, l, n)
    D           : (d,) or None
    initial_state : (b, d, n) or None (zeros)

    s_t = exp(delta_t * A) * s_{t-1} + delta_t * B_t * x_t          (state (b, d, n), fp32)
    y_t = <s_t, C_t> + D * x_t;  y_t *= silu(z_t) if z is given
    y: (b, l, d) in x's dtype; final_state: (b, d, n) fp32 (float64 for float64 inputs)

The function is differentiable in every tensor argument (initial_state included).
A position with delta = 0 and x = 0 leaves the state untouched: that is how padding is masked.

    y = selective_scan_step(x, delta, A, B, C, D, z, state)   # x, delta, z (b, d); B, C (b, n)

updates ``state`` (b, d, n) in place and returns y (b, d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import registry


def selective_scan_reference(x, delta, A, B, C, D=None, z=None, initial_state=None):
    """The oracle: a plain sequential loop over time in fp32 (float64 for float64 inputs)."""
    b, l, d = x.shape
    n = A.shape[1]
    dtype = x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xf, df, Af, Bf, Cf = x.to(acc), delta.to(acc), A.to(acc), B.to(acc), C.to(acc)
    s = initial_state.to(acc) if initial_state is not None else xf.new_zeros(b, d, n)
    ys = []
    for t in range(l):
        dt = df[:, t, :, None]  # (b, d, 1)
        s = torch.exp(dt * Af) * s + (dt * xf[:, t, :, None]) * Bf[:, t, None, :]
        ys.append((s * Cf[:, t, None, :]).sum(-1))  # (b, d)
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, d)
    if D is not None:
        y = y + xf * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(dtype), s


def selective_scan_step_reference(x, delta, A, B, C, D, z, state):
    """One token for every sequence of the batch; updates ``state`` in place."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dt = delta.to(acc).unsqueeze(-1)  # (b, d, 1)
    s = torch.exp(dt * A.to(acc)) * state.to(acc) + (dt * x.to(acc).unsqueeze(-1)) * B.to(acc).unsqueeze(1)
    state.copy_(s)
    y = (s * C.to(acc).unsqueeze(1)).sum(-1)
    if D is not None:
        y = y + x.to(acc) * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype)


registry.register("scan", "reference", selective_scan_reference)
registry.register("scan_step", "reference", selective_scan_step_reference)


def _check(x, delta, A, B, C, D, z, initial_state):
    if x.dim() != 3:
        raise ValueError(f"selective_scan: x must be (batch, length, channels), got shape {tuple(x.shape)}")
    b, l, d = x.shape
    if delta.shape != x.shape:
        raise ValueError(f"selective_scan: delta shape {tuple(delta.shape)} != x shape {tuple(x.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A must be ({d}, n), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (b, l, n):
            raise ValueError(f"selective_scan: {name} must be {(b, l, n)}, got {tuple(t.shape)}")
    if D is not None and D.shape != (d,):
        raise ValueError(f"selective_scan: D must be ({d},), got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"selective_scan: z shape {tuple(z.shape)} != x shape {tuple(x.shape)}")
    if initial_state is not None and initial_state.shape != (b, d, n):
        raise ValueError(f"selective_scan: initial_state must be {(b, d, n)}, got {tuple(initial_state.shape)}")


def selective_scan(x, delta, A, B, C, D=None, z=None, initial_state=None, backend: str | None = None):
    """Run the selective scan with the chosen (or automatic) backend; see the module docstring."""
    _check(x, delta, A, B, C, D, z, initial_state)
    _, fn = registry.resolve("scan", x, backend)
    return fn(x, delta, A, B, C, D, z, initial_state)


def selective_scan_step(x, delta, A, B, C, D, z, state, backend: str | None = None):
    """One decode step; see the module docstring. Shapes are checked here, for every backend: a kernel writes
    the state in place."""
    b, d = x.shape if x.dim() == 2 else (-1, -1)
    n = A.shape[-1] if A.dim() else -1
    if (b < 0 or delta.shape != x.shape or A.shape != (d, n) or B.shape != (b, n) or C.shape != (b, n)
            or (D is not None and D.shape != (d,)) or (z is not None and z.shape != x.shape)
            or state.shape != (b, d, n)):
        shapes = ", ".join(f"{k} {None if t is None else tuple(t.shape)}" for k, t in
                           zip(("x", "delta", "A", "B", "C", "D", "z", "state"), (x, delta, A, B, C, D, z, state)))
        raise ValueError(f"scan_step: {shapes}; need x, delta, z (b, d), A (d, n), B, C (b, n), D (d,), "
                         f"state (b, d, n)")
    _, fn = registry.resolve("scan_step", x, backend)
    return fn(x, delta, A, B, C, D, z, state)
