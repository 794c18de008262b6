"""Sinkhorn load balancing for top-1 routing (no gradient; fp32).

``sinkhorn(logits)`` returns (assignment (T, E), iterations). Two variants:

- ``"vanilla"`` (Megatron): cost = exp(L), d0 = d1 = 1.
- ``"blackmamba"``: cost = exp(2L), d1 initialised to 1 / (E * cost.sum(0)).

Both then alternate d0 = 1 / (T (cost d1).sum(1) + eps), d1 = 1 / (E (d0 cost).sum(0) + eps); the assignment
(the plan) is d0_t cost_te d1_e. At convergence every row of it sums to 1/T and every column to 1/E.

Two stop rules (``stop``):

- ``"delta"`` (the release's): mean |Δd1| < tol, tol 1e-4 by default. An absolute test on d1, whose scale is
  arbitrary (only d0 d1 matters); the BlackMamba initialisation makes d1 ~ 1 / (E Σ_t cost) tiny, so the rule
  fires after one iteration whatever the marginals are.
- ``"marginal"``: max_t |T row_t - 1| < tol, the plan's largest relative row-marginal error, tol
  ``MARGINAL_TOL`` by default. Right after the d1 update every column sums to 1/E (up to eps / (Σ_t d0 cost + eps)
  and rounding), so the rows carry the whole violation; the test is scale-free and the same for both variants.
  1e-2: the argmax loads have stopped moving by then (T = 4096, E = 8, measured), and it stays above the floor
  that eps sets for the BlackMamba variant at temperature 1 (~2e-3). Caveat: that floor grows with the logits'
  spread (eps = 1e-8 is not small beside the variant's (cost d1) of some tokens); at logit std >= 2 the rows
  stall above 0.1 and the rule runs to ``max_iters`` (with eps = 0 it fires in ~10-20 iterations).

``sinkhorn_iterates`` is the iteration itself (``sinkhorn`` runs it until its rule fires); ``balance_metrics``
measures a plan: the argmax routing's max/mean expert load and the relative marginal errors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch

VARIANTS = ("vanilla", "blackmamba")
STOP_RULES = ("delta", "marginal")
DELTA_TOL = 1e-4  # the release's absolute tolerance on mean |Δd1|
MARGINAL_TOL = 1e-2  # relative row-marginal error: every token's row within 1 % of 1/T


@dataclass
class Iterate:
    """The state after ``iteration`` updates (0: the initial scaling, d0 = 1). The plan is d0_t cost_te d1_e."""

    iteration: int
    cost: torch.Tensor  # (T, E) fp32, exp(scale L)
    d0: torch.Tensor  # (T,)
    d1: torch.Tensor  # (E,)
    delta: float  # mean |Δd1| of this iteration's d1 update (inf at iteration 0)

    @cached_property
    def cost_d1(self) -> torch.Tensor:
        """(T,) (cost d1).sum(1): row t of the plan sums to d0_t cost_d1_t; the next d0 is 1 / (T (cost_d1 + eps))
        (computed when first asked for, so the iteration that stops the loop does not pay for it)."""
        return (self.cost * self.d1).sum(1)

    def plan(self) -> torch.Tensor:
        """(T, E) the assignment d0_t cost_te d1_e (what ``sinkhorn`` returns)."""
        return self.d1 * self.cost * self.d0.unsqueeze(1)

    def row_error(self) -> float:
        """max_t |T row_t - 1|: the plan's largest relative row-marginal error (the ``"marginal"`` rule's test)."""
        T = self.cost.shape[0]
        return (T * self.d0 * self.cost_d1 - 1.0).abs().max().item()


@torch.no_grad()
def sinkhorn_iterates(logits: torch.Tensor, variant: str = "blackmamba", eps: float = 1e-8) -> Iterator[Iterate]:
    """Yield the Sinkhorn state of logits (T, E) at iteration 0 (initial scaling), 1, 2, ... without end.

    Each yielded ``Iterate`` holds its own tensors (none is modified later), so a consumer may keep them."""
    if variant not in VARIANTS:
        raise ValueError(f"sinkhorn variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    L = logits.detach().float()
    T, E = L.shape
    scale = 2.0 if variant == "blackmamba" else 1.0
    cost = torch.exp(scale * L)  # (T, E)
    if not torch.isfinite(cost).all():
        # a uniform shift of the logits only rescales d0; use it to stay finite
        cost = torch.exp(scale * (L - L.max()))
    d0 = torch.ones(T, dtype=cost.dtype, device=cost.device)
    if variant == "blackmamba":
        d1 = 1.0 / (E * cost.sum(0))
    else:
        d1 = torch.ones(E, dtype=cost.dtype, device=cost.device)
    it = Iterate(0, cost, d0, d1, math.inf)
    yield it
    while True:
        d0 = (1.0 / T) / (it.cost_d1 + eps)  # (T,)
        d1_new = (1.0 / E) / ((d0.unsqueeze(1) * cost).sum(0) + eps)  # (E,)
        delta = (d1_new - d1).abs().mean().item()
        d1 = d1_new
        it = Iterate(it.iteration + 1, cost, d0, d1, delta)
        yield it


def sinkhorn(logits: torch.Tensor, variant: str = "blackmamba", tol: float | None = None, eps: float = 1e-8,
             max_iters: int = 1000, stop: str = "delta") -> tuple[torch.Tensor, int]:
    """logits (T, E) → (assignment (T, E) fp32, iterations run), iterating until ``stop``'s rule fires (tol
    None: ``DELTA_TOL`` or ``MARGINAL_TOL``) or after ``max_iters``. ``stop="delta"`` is the release's loop,
    bit for bit (see the module docstring for the rules)."""
    if stop not in STOP_RULES:
        raise ValueError(f"sinkhorn stop rule {stop!r}: choose one of {', '.join(STOP_RULES)}")
    if tol is None:
        tol = DELTA_TOL if stop == "delta" else MARGINAL_TOL
    for it in sinkhorn_iterates(logits, variant, eps):
        if it.iteration >= max_iters:
            break
        if it.iteration > 0 and (it.delta if stop == "delta" else it.row_error()) < tol:
            break
    return it.plan(), it.iteration


@torch.no_grad()
def balance_metrics(plan: torch.Tensor | Iterate) -> dict:
    """How balanced a plan (T, E) (or an ``Iterate``'s) is: ``max_load``, the argmax routing's max/mean tokens
    per expert (1.0 = balanced, E = every token on one expert); ``row_err`` = max_t |T row_t - 1| and
    ``col_err`` = max_e |E col_e - 1|, its relative marginal errors (sums taken in fp64)."""
    if isinstance(plan, Iterate):
        plan = plan.plan()
    T, E = plan.shape
    counts = torch.bincount(plan.argmax(1), minlength=E)  # (E,)
    p = plan.double()
    return {"max_load": counts.max().item() * E / T,
            "row_err": (T * p.sum(1) - 1.0).abs().max().item(),
            "col_err": (E * p.sum(0) - 1.0).abs().max().item()}
