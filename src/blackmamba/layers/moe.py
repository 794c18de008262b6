"""Top-1 routed mixture of gated-MLP experts (Switch style, dropless).

Router: Linear(H, E) with bias; gate = sigmoid(router logits).
- eval:  expert = argmax of sigmoid(logits) (the released inference code's choice, ``ops.moe.route_top1``);
- train: expert = argmax of a Sinkhorn-balanced assignment of the detached fp32 logits
  (``router_train_mode``: ``sinkhorn_blackmamba`` (default: the BlackMamba initialisation, the release's stop
  rule), ``sinkhorn`` (Megatron's vanilla), ``sinkhorn_marginal`` (vanilla, stopped when the assignment's
  marginals are within 1%: balanced in fewer iterations, ``ops.sinkhorn``), ``top1``).
The output is expert(x) * sigmoid(chosen logit): the router learns through that gate only. No capacity, no
token dropping. ``forward`` routes and runs the experts (``Experts``: op ``moe_experts``); ``step`` (a few tokens,
inference routing) is op ``moe_step``. The experts are ``GatedMLP``s, so their weights keep the release's names.

Two attributes are the seams parallel training uses from outside (``blackmamba.parallel``), the layer itself knowing
nothing of it: ``balance`` (the Sinkhorn function routing calls; replaced by one that balances over every
data-parallel rank's tokens) and ``local_experts`` (whose call expert parallelism wraps with its token exchange).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.linear import apply, operand, operand_with_bias
from ..ops.moe import bind_moe_step, moe_experts, route_top1
from ..ops.sinkhorn import sinkhorn
from .mlp import GatedMLP

# router_train_mode → (Sinkhorn variant, stop rule)
_SINKHORN = {"sinkhorn_blackmamba": ("blackmamba", "delta"), "sinkhorn": ("vanilla", "delta"),
             "sinkhorn_marginal": ("vanilla", "marginal")}


class Experts(nn.ModuleList):
    """The MoE layer's experts (``GatedMLP``s; the release's ``local_experts``). Calling it runs every token through
    its expert: x (T, H), expert_idx (T,) indices into this list, gate (T, 1) → (T, H) (op ``moe_experts``)."""

    def __init__(self, mlps, activation: str):
        super().__init__(mlps)
        self.activation = activation

    def operands(self) -> tuple[list, list]:
        """The experts' fc1 and fc2 as linear operands (``ops.linear.operand``)."""
        return [operand(e.linear_fc1) for e in self], [operand(e.linear_fc2) for e in self]

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return moe_experts(x, expert_idx, gate, *self.operands(), self.activation)


class MoE(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, activation: str = "silu",
                 router_train_mode: str = "sinkhorn_blackmamba"):
        super().__init__()
        self.num_experts = num_experts
        self.activation = activation
        self.router_train_mode = router_train_mode
        self.router = nn.Linear(hidden_size, num_experts, bias=True)
        self.local_experts = Experts((GatedMLP(hidden_size, ffn_hidden_size, activation)
                                      for _ in range(num_experts)), activation)
        self.balance = sinkhorn  # (logits (T, E), variant, stop=rule) → (assignment (T, E), iterations)
        # routing statistics of the last forward: tokens per expert (E,) and Sinkhorn iterations
        self.last_stats: dict | None = None

    def experts(self) -> tuple[list, list]:
        """The experts' fc1 and fc2 as linear operands (``ops.linear.operand``)."""
        return self.local_experts.operands()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """x (T, H) → (expert index (T,), gate (T, 1), sinkhorn iterations)."""
        logits = apply(x, *operand_with_bias(self.router))  # (T, E)
        if self.training and self.router_train_mode != "top1":
            variant, rule = _SINKHORN[self.router_train_mode]
            assignment, iters = self.balance(logits, variant, stop=rule)
            idx = assignment.argmax(dim=1)
            return idx, torch.sigmoid(logits).gather(1, idx.unsqueeze(1)), iters
        idx, gate = route_top1(logits)
        return idx, gate, 0

    def forward(self, h: torch.Tensor, state=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """h (b, l, H) → (b, l, H). ``last_stats`` records the routing of the real (unmasked) tokens."""
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        idx, gate, iters = self.route(x)
        out = self.local_experts(x, idx, gate)
        counted = idx if mask is None else idx[mask.reshape(-1).bool()]
        self.last_stats = {"tokens_per_expert": torch.bincount(counted.detach(), minlength=self.num_experts),
                           "sinkhorn_iters": iters}
        return out.reshape(shape)

    def bind_step(self):
        """``step`` with the layer's weights bound (op ``moe_step``'s ``bind``: router weight and bias, the
        experts' fc1 and fc2 as linear operands): a callable (h, state=None) → out, valid while no weight is
        replaced, moved or changed (``BlackMambaLM.bind_step``)."""
        op = bind_moe_step(*operand_with_bias(self.router), *self.experts(), self.activation)
        return lambda h, state=None: op(h)

    def step(self, h: torch.Tensor, state=None) -> torch.Tensor:
        """One token per row, h (b, H) → (b, H), with the inference routing (op ``moe_step``)."""
        return self.bind_step()(h)
