"""Sinkhorn load balancing for top-1 routing (no gradient; fp32).

``sinkhorn(logits)`` returns (assignment (T, E), iterations). Two variants:

- ``"vanilla"`` (Megatron): cost = exp(L), d0 = d1 = 1.
- ``"blackmamba"``: cost = exp(2L), d1 initialised to 1 / (E * cost.sum(0)).

Both then alternate d0 = 1 / (T (cost d1).sum(1) + eps), d1 = 1 / (E (d0 cost).sum(0) + eps) until
mean |Δd1| < tol. At convergence every row of the assignment sums to 1/T and every column to 1/E.
"""

from __future__ import annotations

import torch

VARIANTS = ("vanilla", "blackmamba")


@torch.no_grad()
def sinkhorn(logits: torch.Tensor, variant: str = "blackmamba", tol: float = 1e-4, eps: float = 1e-8,
             max_iters: int = 1000) -> tuple[torch.Tensor, int]:
    if variant not in VARIANTS:
        raise ValueError(f"sinkhorn variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    L = logits.detach().float()
    T, E = L.shape
    scale = 2.0 if variant == "blackmamba" else 1.0
    cost = torch.exp(scale * L)
    if not torch.isfinite(cost).all():
        # a uniform shift of the logits only rescales d0; use it to stay finite
        cost = torch.exp(scale * (L - L.max()))
    d0 = torch.ones(T, dtype=cost.dtype, device=cost.device)
    if variant == "blackmamba":
        d1 = 1.0 / (E * cost.sum(0))
    else:
        d1 = torch.ones(E, dtype=cost.dtype, device=cost.device)
    iters = 0
    while iters < max_iters:
        iters += 1
        d0 = (1.0 / T) / ((cost * d1).sum(1) + eps)
        d1_new = (1.0 / E) / ((d0.unsqueeze(1) * cost).sum(0) + eps)
        err = (d1_new - d1).abs().mean().item()
        d1 = d1_new
        if err < tol:
            break
    return d1 * cost * d0.unsqueeze(1), iters
