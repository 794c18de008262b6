"""The block entry as an op (``add_rmsnorm``): residual add + RMSNorm, so a backend can fuse it.

    out, residual = add_rmsnorm(h, residual, weight, eps, residual_dtype)

is what every block (``model.Block``) does before its mixer, in ``forward`` and ``step``:

    residual = h if residual is None else h + residual      (then cast to ``residual_dtype``)
    out = RMSNorm(residual.to(weight.dtype))                 (in fp32, returned in weight's dtype)

h (..., H); residual (..., H) or None (the first block); weight (H,). At decode time these are about
ten tiny tensor ops per layer, each costing more in dispatch than in arithmetic; the ``cpu`` backend
(``ops/cpu/csrc/norm.cpp``) and the ``triton`` one (``ops/triton/norm.py``) do it in one call. Both
hand a call that needs a gradient to the reference.
"""

from __future__ import annotations

import torch

from . import registry


def add_rmsnorm_reference(h: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                          residual_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    residual = h if residual is None else h + residual
    x = residual.to(weight.dtype).float()
    out = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(weight.dtype)
    return out, residual.to(residual_dtype)


registry.register("add_rmsnorm", "reference", add_rmsnorm_reference)


def add_rmsnorm(h: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                residual_dtype: torch.dtype, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm of the new residual in weight's dtype, new residual in ``residual_dtype``); see the module
    docstring."""
    if h.shape[-1] != weight.shape[-1] or weight.dim() != 1 or (residual is not None and residual.shape != h.shape):
        raise ValueError(f"add_rmsnorm: h {tuple(h.shape)}, residual "
                         f"{None if residual is None else tuple(residual.shape)}, weight {tuple(weight.shape)}")
    _, fn = registry.resolve("add_rmsnorm", h, backend)
    return fn(h, residual, weight, eps, residual_dtype)


def bind_add_rmsnorm(weight: torch.Tensor, eps: float, residual_dtype: torch.dtype | None = None,
                     backend: str | None = None):
    """``add_rmsnorm`` with its weight fixed: a callable (h, residual) → (out, residual) computing
    ``add_rmsnorm(h, residual, weight, eps, residual_dtype or h.dtype)``, valid while the weight is neither
    replaced nor moved; the backend's own ``bind`` where it has one (ops/registry.py: Binding)."""
    if weight.dim() != 1:
        raise ValueError(f"add_rmsnorm: weight must be (H,), got {tuple(weight.shape)}")
    name, bind = registry.binder("add_rmsnorm", weight, backend)
    if bind is not None:
        return bind(weight, eps, residual_dtype)
    return lambda h, residual: add_rmsnorm(h, residual, weight, eps, residual_dtype or h.dtype, name)
