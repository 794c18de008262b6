"""Top-1 expert dispatch with grouped matmuls (``torch._grouped_mm``): no per-expert loop, no host sync.

The ``triton`` backend of op ``moe_experts`` uses it for many tokens (few tokens: the Triton gemv kernels): apply
expert ``expert_idx[t]``'s gated MLP to every row x[t]; x (T, H), expert_idx (T,) → (T, H), before the gate.
Tokens are sorted by expert, the per-expert token counts become the group offsets on the device (no
``.tolist()``), and each of the two expert matmuls is one grouped GEMM over the stacked expert weights.
Differentiable in x and every expert weight.

``torch._grouped_mm`` takes bf16 on CUDA (compute capability ≥ 8.0) and fp32 or bf16 on CPU; under
autocast the matmuls run in the autocast dtype, as ``nn.Linear`` would.
"""

from __future__ import annotations

import torch

from ..activations import ACTIVATIONS


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether ``dispatch_grouped`` can run for activations like ``x`` (device, dtype, torch version)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    dtype = _compute_dtype(x)
    if x.device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8
    return x.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)


def expert_offsets(expert_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order (T,) sorting tokens by expert, int32 end offsets (E,) of each expert's group)."""
    order = torch.argsort(expert_idx, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_idx.device)
    counts.scatter_add_(0, expert_idx, torch.ones_like(expert_idx))
    return order, counts.cumsum(0).to(torch.int32)


def dispatch_grouped(x: torch.Tensor, expert_idx: torch.Tensor, fc1: list[torch.Tensor], fc2: list[torch.Tensor],
                     activation: str) -> torch.Tensor:
    """Grouped-GEMM gated MLPs of each row's expert: x (T, H), expert_idx (T,) → (T, H)."""
    T, H = x.shape
    if T == 0:
        return x.new_zeros(0, H)
    dtype = _compute_dtype(x)
    order, offs = expert_offsets(expert_idx, len(fc1))
    w1 = torch.stack(list(fc1)).to(dtype)  # (E, 2F, H)
    w2 = torch.stack(list(fc2)).to(dtype)  # (E, H, F)
    xs = x[order].to(dtype)  # (T, H), grouped by expert
    h = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs)  # (T, 2F)
    a, b = h.chunk(2, dim=-1)
    out_sorted = torch._grouped_mm(ACTIVATIONS[activation](a) * b, w2.transpose(1, 2), offs=offs)  # (T, H)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(T, device=x.device)
    return out_sorted[inverse]
