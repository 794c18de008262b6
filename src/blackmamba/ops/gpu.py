"""Registers the ``triton`` backend of ``scan``, ``scan_step`` and ``add_rmsnorm`` for CUDA tensors.

The kernel modules (``triton_scan``, ``triton_step``) are imported on first use, so importing
blackmamba never imports Triton, and Triton decides only then whether to compile or interpret.
"""

from __future__ import annotations

import importlib.util

import torch

from . import backend as _backend


def triton_available() -> bool:
    """A CUDA device is present and Triton is installed (``pip install 'blackmamba[gpu]'``)."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def _scan(x, delta, A, B, C, D, z, initial_state):
    from .triton_scan import selective_scan_triton

    return selective_scan_triton(x, delta, A, B, C, D, z, initial_state)


def _scan_step(x, delta, A, B, C, D, z, state):
    from .triton_step import selective_scan_step_triton

    return selective_scan_step_triton(x, delta, A, B, C, D, z, state)


def _add_rmsnorm(h, residual, weight, eps, residual_dtype):
    from .norm import add_rmsnorm_reference
    from .triton_norm import add_rmsnorm

    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, residual, weight)):
        return add_rmsnorm_reference(h, residual, weight, eps, residual_dtype)  # the kernel has no backward
    H = h.shape[-1]
    out, res = add_rmsnorm(h.reshape(-1, H), None if residual is None else residual.reshape(-1, H), weight, eps,
                           residual_dtype)
    return out.view(h.shape), res.view(h.shape)


_backend.register("scan", "triton", _scan, triton_available, devices=("cuda",))
_backend.register("add_rmsnorm", "triton", _add_rmsnorm, triton_available, devices=("cuda",))
_backend.register("scan_step", "triton", _scan_step, triton_available, devices=("cuda",))
