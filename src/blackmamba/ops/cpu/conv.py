"""The ``cpu`` backend of ops ``conv`` and ``conv_step`` (csrc/conv.cpp, step.cpp): the causal depthwise conv,
forward and backward in the (b, l, d) layout on the split view of ``in_proj``'s output (no transposes or padding
copies), and the one-token step that shifts the state in place."""

from __future__ import annotations

import torch

from .. import registry
from ..conv import causal_conv1d_reference, causal_conv1d_step_reference
from .build import DTYPE_CODE, available, grad_needed, library, ptr, threads_for
from .replay import launch


def conv_forward(x, weight, bias, initial_state):
    """Kernel call on prepared inputs: (y (b, l, d) x.dtype, final state (b, d, K-1) in weight's dtype)."""
    b, l, d = x.shape
    K = weight.shape[1]
    y = torch.empty(b, l, d, dtype=x.dtype)
    final = torch.empty(b, d, K - 1, dtype=weight.dtype)
    rc = launch(library().bm_conv_forward, DTYPE_CODE[x.dtype], ptr(x), x.stride(0), x.stride(1), ptr(weight),
                ptr(bias), ptr(initial_state), ptr(y), ptr(final), b, l, d, K, threads_for(b * l * d * K))
    if rc:
        raise RuntimeError(f"blackmamba cpu conv: unsupported inputs (code {rc})")
    return y, final


class _ConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state):
        y, final = conv_forward(x, weight, bias, initial_state)
        ctx.save_for_backward(x, weight, initial_state)
        ctx.has_bias, ctx.has_initial_state = bias is not None, initial_state is not None
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dfinal):
        x, weight, initial_state = ctx.saved_tensors
        b, l, d = x.shape
        K = weight.shape[1]
        S = weight.dtype
        dy = torch.zeros(b, l, d, dtype=x.dtype) if dy is None else dy.to(x.dtype).contiguous()
        dfinal = None if dfinal is None else dfinal.to(S).contiguous()
        dx = torch.empty(b, l, d, dtype=x.dtype)
        dinit = torch.empty(b, d, K - 1, dtype=S)
        dw = torch.empty(b, d, K, dtype=S)
        dbias = torch.empty(b, d, dtype=S)
        rc = launch(library().bm_conv_backward, DTYPE_CODE[x.dtype], ptr(x), x.stride(0), x.stride(1), ptr(weight),
                    ptr(initial_state), ptr(dy), ptr(dfinal), ptr(dx), ptr(dinit), ptr(dw), ptr(dbias), b, l, d, K,
                    threads_for(b * l * d * K))
        if rc:
            raise RuntimeError(f"blackmamba cpu conv backward: unsupported inputs (code {rc})")
        return (dx, dw.sum(0), dbias.sum(0) if ctx.has_bias else None,
                dinit if ctx.has_initial_state else None)


def causal_conv1d_cpu(x, weight, bias=None, initial_state=None):
    """The ``cpu`` backend of ``causal_conv1d``: (b, l, d) in and out, no transposes or padding copies."""
    if x.dtype not in DTYPE_CODE:
        return causal_conv1d_reference(x, weight, bias, initial_state)
    S = torch.float64 if x.dtype == torch.float64 else torch.float32
    dtype = x.dtype
    xk = x if x.stride(-1) == 1 else x.contiguous()
    args = (xk, weight.to(S).contiguous(), bias.to(S).contiguous() if bias is not None else None,
            initial_state.to(S).contiguous() if initial_state is not None else None)
    if grad_needed(*args):
        y, final = _ConvFunction.apply(*args)
    else:
        y, final = conv_forward(*args)
    return y, final.to(dtype)


def causal_conv1d_step_cpu(x, weight, bias, state):
    """The ``cpu`` backend of ``causal_conv1d_step``: output and state shift in one pass."""
    if (grad_needed(x, weight, bias) or state.dtype != x.dtype or not state.is_contiguous()
            or x.dtype not in DTYPE_CODE):
        return causal_conv1d_step_reference(x, weight, bias, state)
    b, d = x.shape
    x = x.contiguous()
    weight = weight.to(x.dtype).contiguous()
    bias = bias.to(x.dtype).contiguous() if bias is not None else None
    y = torch.empty_like(x)
    launch(library().bm_conv_step, DTYPE_CODE[x.dtype], ptr(x), ptr(weight), ptr(bias), ptr(state), ptr(y), b, d,
           weight.shape[1], threads_for(b * d * weight.shape[1]))
    return y


registry.register("conv", "cpu", causal_conv1d_cpu, available, devices=("cpu",))
registry.register("conv_step", "cpu", causal_conv1d_step_cpu, available, devices=("cpu",))
