"""Causal multi-head self-attention with rotary positions (for transformer baselines).

State per sequence (``AttentionState``): the keys and values seen so far, which grow with the context (unlike
Mamba's), a mask of which of them are real tokens, and the number of real tokens, which is the position of the
next one. Positions count real tokens only, so a left-padded row computes exactly what it computes alone, and rows
of different lengths can share a batch (``blackmamba.state.State.cat``): padded keys are masked out of every
query's view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import apply, operand


@dataclass
class AttentionState:
    TIME_DIMS: ClassVar[dict[str, int]] = {"k": 2, "v": 2, "key_mask": 1}  # what grows with the context
    k: torch.Tensor  # (b, heads, t, head_dim), rotated
    v: torch.Tensor
    key_mask: torch.Tensor  # (b, t) bool: which cached keys are real tokens
    pos: torch.Tensor  # (b,) int64: real tokens consumed, the next token's position


def _rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """x (b, heads, l, hd), positions (b, l) → x rotated pairwise (first half with second half)."""
    hd = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    ang = positions.float()[..., None] * inv  # (b, l, hd/2)
    cos, sin = ang.cos().to(x.dtype)[:, None], ang.sin().to(x.dtype)[:, None]  # (b, 1, l, hd/2)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def positions(start: torch.Tensor | None, mask: torch.Tensor | None, b: int, l: int, device) -> torch.Tensor:
    """(b, l) positions of new tokens: each row continues from ``start`` (b,) (None: 0), counting only its real
    tokens (``mask`` (b, l), None: all real); a padded position repeats its row's next position."""
    start = start[:, None] if start is not None else torch.zeros(b, 1, dtype=torch.long, device=device)
    if mask is None:
        return start + torch.arange(l, device=device)
    return start + mask.long().cumsum(1) - mask.long()


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def new_state(self, batch_size: int, dtype: torch.dtype, device) -> AttentionState:
        empty = torch.zeros(batch_size, self.num_heads, 0, self.head_dim, dtype=dtype, device=device)
        return AttentionState(k=empty, v=empty.clone(), key_mask=torch.zeros(batch_size, 0, dtype=torch.bool,
                                                                              device=device),
                              pos=torch.zeros(batch_size, dtype=torch.long, device=device))

    def forward(self, h: torch.Tensor, state: AttentionState | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """h (b, l, H) → (b, l, H); appends to ``state`` when given."""
        b, l, H = h.shape
        q, k, v = apply(h, operand(self.qkv_proj)).view(b, l, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        pos = positions(state.pos if state is not None else None, mask, b, l, h.device)
        q, k = _rotary(q, pos), _rotary(k, pos)
        key_mask = mask.bool() if mask is not None else torch.ones(b, l, dtype=torch.bool, device=h.device)
        if state is not None:
            k = torch.cat([state.k.to(k.dtype), k], dim=2)
            v = torch.cat([state.v.to(v.dtype), v], dim=2)
            key_mask = torch.cat([state.key_mask, key_mask], dim=1)
            state.k, state.v, state.key_mask = k.detach().to(state.k.dtype), v.detach().to(state.v.dtype), key_mask
            state.pos += l if mask is None else mask.long().sum(1)
        t = k.shape[2]
        causal = torch.ones(l, t, dtype=torch.bool, device=h.device).tril(diagonal=t - l)  # (l, t)
        allowed = causal[None, None] & key_mask[:, None, None, :]  # (b, 1, l, t)
        # a query whose every key is masked (a padded query) attends to nothing: give it itself
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return apply(y.transpose(1, 2).reshape(b, l, H), operand(self.out_proj))

    def bind_step(self):
        return self.step  # nothing to fetch ahead: the step is ``forward`` on one position

    def step(self, h: torch.Tensor, state: AttentionState) -> torch.Tensor:
        """One token per row: h (b, H) → (b, H), appending its key and value to ``state``."""
        return self.forward(h[:, None], state)[:, 0]
