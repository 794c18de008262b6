"""The ``triton`` backend: Triton kernels for CUDA tensors, registered with the op registry.

- ``scan`` (``scan.py``: chunked scan, forward and backward), ``scan_step`` and ``conv_step`` (``step.py``),
  ``add_rmsnorm`` (``norm.py``), ``mamba_step`` (``step.py``: the conv and SSM updates fused, the projections
  with cuBLAS), ``moe_experts`` and ``moe_step`` (``moe.py``: each token streams its expert's weights; many
  tokens use ``torch._grouped_mm``, ``grouped_mm.py``).
- ``conv`` and ``linear`` have no Triton kernel: the reference (cuDNN, cuBLAS) computes them.

Under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is imported) the same kernels run on CPU
tensors, one program at a time in NumPy: that is how the wiring of the whole GPU path is tested on machines
without a GPU (``BLACKMAMBA_BACKEND=triton``). The kernel modules are imported on first use, so importing
blackmamba never imports Triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .. import registry
from ..linear import all_tensors


def interpreting() -> bool:
    """Triton interprets kernels on the CPU instead of compiling them for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def available() -> bool:
    """Triton is installed, and a CUDA device is present or Triton interprets (``pip install 'blackmamba[gpu]'``)."""
    return (torch.cuda.is_available() or interpreting()) and importlib.util.find_spec("triton") is not None


def _no_grad(*tensors) -> bool:
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _scan(x, delta, A, B, C, D, z, initial_state):
    from .scan import selective_scan_triton

    return selective_scan_triton(x, delta, A, B, C, D, z, initial_state)


def _scan_step(x, delta, A, B, C, D, z, state):
    from .step import ssm_update

    return ssm_update(state, x, delta, A, B, C, D, z)


def _conv_step(x, weight, bias, state):
    from ..conv import causal_conv1d_step_reference
    from .step import conv_update

    if state.dtype != x.dtype:
        return causal_conv1d_step_reference(x, weight, bias, state)
    return conv_update(x, weight, bias, state, silu=False)


def _add_rmsnorm(h, residual, weight, eps, residual_dtype):
    from ..norm import add_rmsnorm_reference
    from .norm import add_rmsnorm as kernel

    if not _no_grad(h, residual, weight):
        return add_rmsnorm_reference(h, residual, weight, eps, residual_dtype)  # the kernel has no backward
    H = h.shape[-1]
    out, res = kernel(h.reshape(-1, H), None if residual is None else residual.reshape(-1, H), weight, eps,
                      residual_dtype)
    return out.view(h.shape), res.view(h.shape)


def _mamba_step(h, in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A_log, D, out_proj, conv_state, ssm_state):
    from ..mamba_step import mamba_step_reference
    from .step import mamba_step as kernels

    if not all_tensors(in_proj, x_proj, out_proj) or not _no_grad(h, in_proj, x_proj, out_proj, dt_w, A_log):
        return mamba_step_reference(h, in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A_log, D, out_proj, conv_state,
                                    ssm_state)
    return kernels(h, in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A_log, D, out_proj, conv_state, ssm_state)


GEMV_MAX_TOKENS = 16  # up to this many tokens each streams its expert's weights; more share them in grouped GEMMs


def _moe_experts(x, expert_idx, gate, fc1, fc2, activation):
    from ..moe import moe_experts_reference
    from .grouped_mm import dispatch_grouped, grouped_mm_supported
    from .moe import expert_gemv

    if not all_tensors(*fc1, *fc2):
        return moe_experts_reference(x, expert_idx, gate, fc1, fc2, activation)
    if x.shape[0] <= GEMV_MAX_TOKENS and _no_grad(x, gate, *fc1, *fc2):
        return expert_gemv(x, expert_idx, gate.to(x.dtype), fc1, fc2, activation)
    if grouped_mm_supported(x):
        out = dispatch_grouped(x, expert_idx, fc1, fc2, activation)
        return out * gate.to(out.dtype)
    return moe_experts_reference(x, expert_idx, gate, fc1, fc2, activation)


def _moe_step(h, router_w, router_b, fc1, fc2, activation):
    from ..moe import moe_step_reference
    from .moe import route_top1

    if not all_tensors(router_w, *fc1, *fc2) or not _no_grad(h, router_w, router_b, *fc1, *fc2):
        return moe_step_reference(h, router_w, router_b, fc1, fc2, activation)
    gate, idx = route_top1(h, router_w, router_b)
    return _moe_experts(h, idx, gate[:, None], fc1, fc2, activation)


_DEVICES = ("cuda", "cpu") if interpreting() else ("cuda",)
for _op, _fn in (("scan", _scan), ("scan_step", _scan_step), ("conv_step", _conv_step), ("add_rmsnorm", _add_rmsnorm),
                 ("mamba_step", _mamba_step), ("moe_experts", _moe_experts), ("moe_step", _moe_step)):
    registry.register(_op, "triton", _fn, available, devices=_DEVICES)
