"""The linear layer as an op (``linear``), and the one test of whether a projection can go to a kernel.

    y = linear(x, weight, bias=None)      # x (..., i), weight (o, i), bias (o,) → y (..., o) = F.linear

Backends: ``reference`` is ``F.linear``; ``cpu`` takes a few rows without autograd with its own gemv (decoding
is limited by reading the weights: it reads them once, bfloat16 ones directly, where torch's CPU bfloat16 matmul
is slow at that shape without native bfloat16 instructions; and each row's result is the same whatever the
other rows) and is ``F.linear`` otherwise.

Ops that take projections (``mamba_step``, ``moe_experts``, ``moe_step``) take *linear operands*: the weight
of a plain ``nn.Linear`` — which a kernel can read —, the ``QuantizedWeight`` of a quantized linear layer
(``layers.quantized``; op ``linear`` takes it), or, for anything else (a LoRA wrapper), the module itself, called
as it is so that nothing it adds is skipped (``operand``; ``operand_with_bias`` for a projection with a bias);
``apply`` computes any of them. A backend given an operand its kernel does not read hands the call to the
reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import registry
from .quant import QuantizedWeight, product_input


def linear_reference(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; a ``QuantizedWeight`` is dequantized first, to x's dtype (float32 for an integer x), and x
    quantized per group (ops/quant.py ``product_input``: the product is defined so)."""
    if isinstance(weight, QuantizedWeight):
        x = product_input(x if x.is_floating_point() else x.float(), weight)
        weight = weight.dequantize(x.dtype)
    return F.linear(x, weight, bias)


registry.register("linear", "reference", linear_reference)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through the backend registry (op ``linear``)."""
    _, fn = registry.resolve("linear", x, backend)
    return fn(x, weight, bias)


def plain(module: nn.Module) -> bool:
    """Whether ``module`` is a plain ``nn.Linear``, whose weight (and bias) a kernel may read instead of calling it."""
    return type(module) is nn.Linear


def _quantized(module: nn.Module) -> bool:
    """A ``layers.quantized.QuantizedLinear`` itself (bias-free; its ``weight`` a ``QuantizedWeight``), not a
    wrapper around one that forwards ``weight`` (its own call must run, as for any other module)."""
    return getattr(type(module), "QUANTIZED_OPERAND", False)


def operand(module: nn.Module):
    """The weight of a plain bias-free ``nn.Linear`` (a tensor) or of a quantized linear layer (a
    ``QuantizedWeight``); any other module as itself (called by ``apply``)."""
    return module.weight if (plain(module) and module.bias is None) or _quantized(module) else module


def operand_with_bias(module: nn.Module) -> tuple:
    """(weight, bias) of a plain ``nn.Linear`` or a quantized one (bias None); (module, None) for any other."""
    if plain(module):
        return module.weight, module.bias
    return (module.weight, None) if _quantized(module) else (module, None)


def apply(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A linear operand applied to x: op ``linear`` for a weight (a tensor or a ``QuantizedWeight``), the
    module's own call otherwise."""
    return linear(x, weight, bias) if torch.is_tensor(weight) or isinstance(weight, QuantizedWeight) else weight(x)


def all_tensors(*weights) -> bool:
    """Whether every operand is a plain weight tensor (what the fused kernels take)."""
    return all(w is None or torch.is_tensor(w) for w in weights)
