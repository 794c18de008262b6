"""Gated MLP (the release's expert and dense layer): fc2(act(a) * b) with a, b = split(fc1(x))."""

import torch
from torch import nn

from ..ops.grouped_mlp import ACTIVATIONS  # silu; gelu: exact erf, as the released inference code
from ..ops.linear import linear_module


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "silu"):
        super().__init__()
        self.ffn_hidden_size = ffn_hidden_size
        self.activation = activation
        self.linear_fc1 = nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=False)  # gate rows first
        self.linear_fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, **_) -> torch.Tensor:
        a, b = linear_module(self.linear_fc1, x).chunk(2, dim=-1)  # op `linear`: decode-sized gemv on CPU
        return linear_module(self.linear_fc2, ACTIVATIONS[self.activation](a) * b)
