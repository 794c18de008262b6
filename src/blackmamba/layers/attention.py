"""Causal multi-head self-attention with rotary positions (for transformer baselines).

State per sequence: the keys and values seen so far (grows with the context, unlike Mamba's).
A padding mask (b, l) keeps padded keys out of every query's view; rotary positions are relative, so
left padding does not change what the real tokens compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionState:
    k: torch.Tensor  # (b, heads, t, head_dim)
    v: torch.Tensor
    key_mask: torch.Tensor  # (b, t) bool: which cached keys are real tokens


def _rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """x (b, heads, l, hd), positions (l,) → x rotated pairwise (first half with second half)."""
    hd = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    ang = positions.float()[:, None] * inv[None, :]  # (l, hd/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


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
                                                                              device=device))

    def forward(self, h: torch.Tensor, state: AttentionState | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, l, H = h.shape
        q, k, v = self.qkv_proj(h).view(b, l, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        past = state.k.shape[2] if state is not None else 0
        pos = torch.arange(past, past + l, device=h.device)
        q, k = _rotary(q, pos), _rotary(k, pos)
        key_mask = mask.bool() if mask is not None else torch.ones(b, l, dtype=torch.bool, device=h.device)
        if state is not None:
            k = torch.cat([state.k, k], dim=2)
            v = torch.cat([state.v, v], dim=2)
            key_mask = torch.cat([state.key_mask, key_mask], dim=1)
            state.k, state.v, state.key_mask = k.detach(), v.detach(), key_mask
        t = k.shape[2]
        causal = torch.ones(l, t, dtype=torch.bool, device=h.device).tril(diagonal=t - l)  # (l, t)
        allowed = causal[None, None] & key_mask[:, None, None, :]  # (b, 1, l, t)
        # a query whose every key is masked (a padded query) attends to nothing: give it itself
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out_proj(y.transpose(1, 2).reshape(b, l, H))
