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
        return gated_mlp(x, *self.step_args())

    def step_args(self) -> tuple:
        return operand(self.linear_fc1), operand(self.linear_fc2), self.activation

    def step(self, x: torch.Tensor, state=None, args: tuple | None = None) -> torch.Tensor:
        return gated_mlp(x, *(args or self.step_args()))
