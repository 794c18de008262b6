"""Residual add + RMSNorm in one Triton kernel (decode: one kernel instead of about eight per layer).

The model's block entry (``model.BlackMambaLM.forward``) is

    residual = h + residual            (h alone for the first block; fp32 when residual_in_fp32)
    out = RMSNorm(residual.to(w.dtype)) = x·rsqrt(mean(x²) + eps)·w, in fp32, returned in w's dtype

``add_rmsnorm`` computes both outputs with the same roundings (the residual is rounded to the norm's
dtype before normalising, as the ``.to`` does). At batch 1 each of those small ops is a kernel of a
few microseconds, which dominate a CUDA-graph decode step once the weights stream at full bandwidth.

Shapes: h (b, H); residual (b, H) or None; weight (H,) → (out (b, H) in weight's dtype, residual (b, H)).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm_kernel(h_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, H, eps,
                        sh_b, sr_b, so_b, sro_b,
                        HAS_RES: tl.constexpr, BH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BH)
    mask = offs < H
    r = tl.load(h_ptr + row * sh_b + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r += tl.load(res_ptr + row * sr_b + offs, mask=mask, other=0.0).to(tl.float32)
    r_out = r.to(res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + row * sro_b + offs, r_out, mask=mask)
    x = r_out.to(out_ptr.dtype.element_ty).to(tl.float32)  # residual.to(weight dtype), then fp32
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * so_b + offs, (x * inv * w).to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(h: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                residual_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual') in weight's dtype, residual' = h + residual in ``residual_dtype``)."""
    b, H = h.shape
    if weight.shape != (H,) or (residual is not None and residual.shape != h.shape):
        raise ValueError(f"add_rmsnorm: h {tuple(h.shape)}, residual "
                         f"{None if residual is None else tuple(residual.shape)}, weight {tuple(weight.shape)}")
    h = h if h.stride(1) == 1 else h.contiguous()
    res_out = torch.empty((b, H), dtype=residual_dtype, device=h.device)
    out = torch.empty((b, H), dtype=weight.dtype, device=h.device)
    res = residual if residual is None or residual.stride(1) == 1 else residual.contiguous()
    ctx = torch.cuda.device(h.device) if h.is_cuda else contextlib.nullcontext()
    with ctx:
        _add_rmsnorm_kernel[(b,)](
            h, res if res is not None else h, weight, out, res_out, H, eps,
            h.stride(0), res.stride(0) if res is not None else 0, out.stride(0), res_out.stride(0),
            HAS_RES=res is not None, BH=triton.next_power_of_2(H), num_warps=4 if H <= 2048 else 8)
    return out, res_out
