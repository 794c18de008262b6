"""Causal depthwise 1-D convolution (Mamba's short conv), full sequence and single step.

Shapes: x (b, l, d); weight (d, K); bias (d,) or None; state (b, d, K-1) holds the previous K-1
inputs, oldest first (zeros at the start of a sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import registry


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = bias + sum_k weight[:, k] * x_{t-K+1+k}; returns (y (b, l, d), final state (b, d, K-1))."""
    b, l, d = x.shape
    K = weight.shape[1]
    xt = x.transpose(1, 2)  # (b, d, l)
    if initial_state is None:
        prev = xt.new_zeros(b, d, K - 1)
    else:
        prev = initial_state.to(xt.dtype)
    if l == 0:
        return x.new_zeros(b, 0, d), prev
    xs = torch.cat([prev, xt], dim=2)  # (b, d, l + K - 1)
    y = F.conv1d(xs, weight.unsqueeze(1).to(xt.dtype), bias.to(xt.dtype) if bias is not None else None, groups=d)
    final = xs[:, :, xs.shape[2] - (K - 1):]
    return y.transpose(1, 2), final


def causal_conv1d_step_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 state: torch.Tensor) -> torch.Tensor:
    """One token: x (b, d) → y (b, d); shifts ``state`` (b, d, K-1) in place."""
    window = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # (b, d, K)
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    state.copy_(window[:, :, 1:])
    return y


registry.register("conv", "reference", causal_conv1d_reference)
registry.register("conv_step", "reference", causal_conv1d_step_reference)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  initial_state: torch.Tensor | None = None,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = bias + sum_k weight[:, k] * x_{t-K+1+k}; returns (y (b, l, d), final state (b, d, K-1)) (op ``conv``)."""
    _, fn = registry.resolve("conv", x, backend)
    return fn(x, weight, bias, initial_state)


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       state: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """One token: x (b, d) → y (b, d); shifts ``state`` (b, d, K-1) in place (op ``conv_step``). Shapes are
    checked here, for every backend: a kernel writes the state in place."""
    if (x.dim() != 2 or weight.dim() != 2 or weight.shape[0] != x.shape[1]
            or (bias is not None and bias.shape != (x.shape[1],))
            or state.shape != (x.shape[0], x.shape[1], weight.shape[1] - 1)):
        raise ValueError(f"conv_step: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}, state {tuple(state.shape)}; need x (b, d), "
                         f"weight (d, K), bias (d,) or None, state (b, d, K-1)")
    _, fn = registry.resolve("conv_step", x, backend)
    return fn(x, weight, bias, state)
