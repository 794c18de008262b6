"""One decode step of the Mamba mixer as a single op (``mamba_step``), so a backend can fuse all of it.

    out = mamba_step(h, in_w, conv_w, conv_b, x_w, dt_w, dt_b, A_log, D, out_w, conv_state, ssm_state)

h (b, H); in_w (2I, H); conv_w (I, K), conv_b (I,); x_w (R+2N, I); dt_w (I, R), dt_b (I,); A_log (I, N);
D (I,); out_w (H, I); conv_state (b, I, K-1) and ssm_state (b, I, N) are updated in place; out (b, H).
The reference is the mixer's step written with the other ops (linear, conv_step, scan_step); the
``cpu`` backend (ops/cpu.py) does it in one call, reading each weight matrix once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend as _backend
from .conv import causal_conv1d_step
from .linear import linear
from .scan import selective_scan_step


def mamba_step_reference(h, in_w, conv_w, conv_b, x_w, dt_w, dt_b, A_log, D, out_w, conv_state, ssm_state):
    I, N, R = conv_w.shape[0], A_log.shape[1], dt_w.shape[1]
    x, z = linear(h, in_w).split([I, I], dim=-1)  # (b, I) each
    x = F.silu(causal_conv1d_step(x, conv_w, conv_b, conv_state))
    dt, B, C = linear(x, x_w).split([R, N, N], dim=-1)
    delta = F.softplus(linear(dt, dt_w).float() + dt_b.float())  # matmul in the model dtype, the rest in fp32
    y = selective_scan_step(x, delta, -torch.exp(A_log.float()), B, C, D, z, ssm_state)
    return linear(y, out_w)


_backend.register("mamba_step", "reference", mamba_step_reference)


def mamba_step(h, in_w, conv_w, conv_b, x_w, dt_w, dt_b, A_log, D, out_w, conv_state, ssm_state,
               backend: str | None = None):
    """One token per sequence through the Mamba mixer; see the module docstring."""
    _, fn = _backend.resolve("mamba_step", h.device, backend)
    return fn(h, in_w, conv_w, conv_b, x_w, dt_w, dt_b, A_log, D, out_w, conv_state, ssm_state)
