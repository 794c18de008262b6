"""RMSNorm (weight only) as the block's entry: the residual add and the norm in one op (``ops.add_rmsnorm``).

    out, residual = norm(h, residual, residual_dtype)
    # residual = h (+ residual), in residual_dtype; out = RMSNorm(residual) computed in fp32, in the weight's dtype
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.norm import add_rmsnorm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None = None,
                residual_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rmsnorm(h, residual, self.weight, self.eps, residual_dtype or h.dtype)
