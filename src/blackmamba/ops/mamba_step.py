"""One decode step of the Mamba mixer as a single op (``mamba_step``), so a backend can fuse all of it.

    out = mamba_step(h, in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A, D, out_proj, conv_state, ssm_state)

h (b, H). ``in_proj`` (2I, H), ``x_proj`` (R+2N, I), ``out_proj`` (H, I): linear operands (``ops.linear.operand``:
a weight, or a module such as a LoRA wrapper, called as itself). conv_w (I, K), conv_b (I,); dt_w (I, R),
dt_b (I,); A (I, N) float32, the mixer's -exp(A_log) (computed once by its ``bind_step``, not every step: one
exponential a state fewer); D (I,); conv_state (b, I, K-1) and ssm_state (b, I, N) are updated in place; out (b, H).

The reference is the mixer's step written with the other ops (linear, conv_step, scan_step) — what
``layers.MambaMixer.forward`` computes for one token. Backends: ``cpu`` (``ops/cpu/decode.py``) does it in one
call reading each weight matrix once; ``triton`` (``ops/triton/step.py``) fuses the conv and SSM updates.
"""

from __future__ import annotations

import torch.nn.functional as F

from . import registry
from .conv import causal_conv1d_step
from .linear import apply, linear
from .scan import selective_scan_step


def mamba_step_reference(h, in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A, D, out_proj, conv_state, ssm_state):
    I, N, R = conv_w.shape[0], A.shape[1], dt_w.shape[1]
    x, z = apply(h, in_proj).split([I, I], dim=-1)  # (b, I) each
    x = F.silu(causal_conv1d_step(x, conv_w, conv_b, conv_state))
    dt, B, C = apply(x, x_proj).split([R, N, N], dim=-1)
    delta = F.softplus(linear(dt, dt_w).float() + dt_b.float())  # matmul in the model dtype, the rest in fp32
    y = selective_scan_step(x, delta, A.float(), B, C, D, z, ssm_state)
    return apply(y, out_proj)


registry.register("mamba_step", "reference", mamba_step_reference)


def mamba_step(h, in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A, D, out_proj, conv_state, ssm_state,
               backend: str | None = None):
    """One token per sequence through the Mamba mixer; see the module docstring."""
    _, fn = registry.resolve("mamba_step", h, backend)
    return fn(h, in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A, D, out_proj, conv_state, ssm_state)


def bind_mamba_step(in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A, D, out_proj, backend: str | None = None):
    """``mamba_step`` with its weights fixed: a callable (h, conv_state, ssm_state) → out computing
    ``mamba_step(h, in_proj, ..., out_proj, conv_state, ssm_state)``, valid while the weights are neither replaced
    nor moved; the backend's own ``bind`` where it has one (ops/registry.py: Binding)."""
    name, bind = registry.binder("mamba_step", conv_w, backend)
    weights = (in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A, D, out_proj)
    if bind is not None:
        return bind(*weights)
    return lambda h, conv_state, ssm_state: mamba_step(h, *weights, conv_state, ssm_state, backend=name)
