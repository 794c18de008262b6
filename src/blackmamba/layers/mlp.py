"""Gated MLP (the release's dense layer, and each expert of a MoE layer): fc2(act(a) * b), a, b = split(fc1(x)).

Stateless: ``step`` (one token per row, (b, H)) is ``forward`` on those rows.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.linear import operand
from ..ops.moe import gated_mlp


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "silu"):
        super().__init__()
        self.ffn_hidden_size = ffn_hidden_size
        self.activation = activation
        self.linear_fc1 = nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=False)  # gate rows first
        self.linear_fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, state=None, mask=None) -> torch.Tensor:
        return gated_mlp(x, operand(self.linear_fc1), operand(self.linear_fc2), self.activation)

    def bind_step(self):
        """``step`` with the layer's linear operands fetched once: a callable (x, state=None) → out."""
        fc1, fc2, activation = operand(self.linear_fc1), operand(self.linear_fc2), self.activation
        return lambda x, state=None: gated_mlp(x, fc1, fc2, activation)

    def step(self, x: torch.Tensor, state=None) -> torch.Tensor:
        return self.forward(x)
