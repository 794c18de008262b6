"""Mamba-1 selective-SSM mixer (H = hidden, I = expand·H, N = state, R = dt rank, K = conv width).

    x, z   = split(in_proj(h), [I, I])
    x      = silu(causal_conv1d(x) + conv_bias)
    dt,B,C = split(x_proj(x), [R, N, N])
    delta  = softplus(dt_proj(dt))                 (fp32)
    y      = selective_scan(x, delta, -exp(A_log), B, C, D, z)
    out    = out_proj(y)

``forward`` runs a sequence (b, l, H) through the ops ``conv`` and ``scan``; ``step`` runs one token per row
(b, H) through op ``mamba_step``, whose reference is this same computation for one token.

Recurrent state per sequence (``MambaState``): conv (I, K-1) — the last K-1 conv inputs, in the state dtype —
and ssm (I, N) in fp32. A padding mask (b, l) zeroes the conv input and the step size at padded positions, so
padding never reaches the conv or SSM state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.conv import causal_conv1d
from ..ops.linear import apply, linear, operand
from ..ops.mamba_step import bind_mamba_step
from ..ops.scan import selective_scan


@dataclass
class MambaState:
    conv: torch.Tensor  # (b, I, K-1): the state dtype (the model's by default; fp32 is allowed)
    ssm: torch.Tensor  # (b, I, N), fp32


class MambaMixer(nn.Module):
    def __init__(self, hidden_size: int, state_size: int = 16, conv_width: int = 4, expand: int = 2,
                 dt_rank: int | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.d_inner = I = expand * hidden_size
        self.state_size = N = state_size
        self.conv_width = K = conv_width
        self.dt_rank = R = dt_rank if dt_rank is not None else math.ceil(hidden_size / 16)
        self.in_proj = nn.Linear(hidden_size, 2 * I, bias=False)
        self.conv1d = nn.Conv1d(I, I, K, groups=I, padding=K - 1, bias=True)  # weight (I, 1, K)
        self.x_proj = nn.Linear(I, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, I, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(I, 1))
        self.D = nn.Parameter(torch.ones(I))
        self.out_proj = nn.Linear(I, hidden_size, bias=False)
        self.reset_dt(dt_min=1e-3, dt_max=0.1)

    @torch.no_grad()
    def reset_dt(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """Mamba's initialisation: dt_proj weight U(±R^-1/2), softplus(bias) log-uniform in [dt_min, dt_max]."""
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def new_state(self, batch_size: int, dtype: torch.dtype, device) -> MambaState:
        return MambaState(
            conv=torch.zeros(batch_size, self.d_inner, self.conv_width - 1, dtype=dtype, device=device),
            ssm=torch.zeros(batch_size, self.d_inner, self.state_size, dtype=torch.float32, device=device),
        )

    def forward(self, h: torch.Tensor, state: MambaState | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """h (b, l, H) → (b, l, H); consumes and updates ``state`` in place when given."""
        I, N, R = self.d_inner, self.state_size, self.dt_rank
        x, z = apply(h, operand(self.in_proj)).split([I, I], dim=-1)  # (b, l, I) each
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        x, conv_final = causal_conv1d(x, self.conv1d.weight[:, 0], self.conv1d.bias,
                                      state.conv if state is not None else None)
        x = F.silu(x)
        dt, B, C = apply(x, operand(self.x_proj)).split([R, N, N], dim=-1)
        # dt_proj's matmul in the model dtype, its bias and the softplus in fp32 (as the release's scan does)
        delta = F.softplus(linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float())  # (b, l, I)
        if mask is not None:
            delta = delta * mask.unsqueeze(-1).to(delta.dtype)
        A = -torch.exp(self.A_log.float())  # (I, N)
        y, ssm_final = selective_scan(x, delta, A, B, C, self.D, z,
                                      initial_state=state.ssm if state is not None else None)
        if state is not None:
            state.conv.copy_(conv_final.detach())
            state.ssm.copy_(ssm_final.detach())
        return apply(y, operand(self.out_proj))

    def bind_step(self):
        """``step`` with the layer's weights bound (op ``mamba_step``'s ``bind``, weights as linear operands, A =
        -exp(A_log) computed here once): a callable (h, state) → out, valid while no weight is replaced, moved or
        changed (``BlackMambaLM.bind_step``)."""
        op = bind_mamba_step(operand(self.in_proj), self.conv1d.weight[:, 0], self.conv1d.bias, operand(self.x_proj),
                             self.dt_proj.weight, self.dt_proj.bias, -torch.exp(self.A_log.float()), self.D,
                             operand(self.out_proj))
        return lambda h, state: op(h, state.conv, state.ssm)

    def step(self, h: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token per row: h (b, H) → (b, H); updates ``state`` in place (op ``mamba_step``)."""
        return self.bind_step()(h, state)
