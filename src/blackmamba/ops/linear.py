"""The linear layer as an op (``linear``), so that decode-time matrix-vector products can use a kernel.

    y = linear(x, weight, bias=None)      # x (..., i), weight (o, i), bias (o,) → y (..., o) = F.linear

Backends: ``reference`` is ``F.linear``; ``cpu`` (ops/cpu.py) reads bfloat16 weights directly for a
few rows without autograd — torch's CPU bfloat16 matmul is slow at that shape on CPUs without native
bfloat16 instructions, and decoding is limited by reading the weights — and is ``F.linear`` otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import backend as _backend


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


_backend.register("linear", "reference", linear_reference)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through the backend registry (op ``linear``)."""
    _, fn = _backend.resolve("linear", x.device, backend)
    return fn(x, weight, bias)


def linear_module(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a plain ``nn.Linear``, through op ``linear``; any other module (a LoRA wrapper,
    a quantised layer, ...) is called as it is, so nothing it adds is skipped."""
    if type(module) is nn.Linear:
        return linear(x, module.weight, module.bias)
    return module(x)
