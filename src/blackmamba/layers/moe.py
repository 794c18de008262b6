"""Top-1 routed mixture of gated-MLP experts (Switch style, dropless).

Router: Linear(H, E) with bias; gate = sigmoid(router logits).
- eval:  expert = argmax of sigmoid(logits) (the released inference code's choice);
- train: expert = argmax of a Sinkhorn-balanced assignment of the detached fp32 logits
  (``router_train_mode``: ``sinkhorn_blackmamba`` (default), ``sinkhorn`` (Megatron's vanilla), ``top1``).
The output is expert(x) * sigmoid(chosen logit): the router learns through that gate only.
Tokens are dispatched by sorting them by expert, no capacity, no dropping; the experts then run as op
``grouped_mlp`` (on CPU: one expert per thread, or each matmul one batched GEMM over all experts), or as
modules where an expert is not a plain ``GatedMLP`` of ``nn.Linear`` layers (a LoRA wrapper, a quantised
layer, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.grouped_mlp import grouped_mlp
from ..ops.grouped_moe import dispatch_grouped, grouped_mm_supported
from ..ops.linear import linear_module
from ..ops.sinkhorn import sinkhorn
from .mlp import GatedMLP

_SINKHORN_VARIANT = {"sinkhorn_blackmamba": "blackmamba", "sinkhorn": "vanilla"}


class _PermuteRows(torch.autograd.Function):
    """x[index] for a permutation ``index`` whose inverse is ``inverse``: the backward is the inverse gather
    (indexing's generic backward is an accumulating index_put, several times slower on CPU)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def dispatch_sorted(x: torch.Tensor, expert_idx: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """Apply ``experts[expert_idx[t]]`` to every row x[t]; x (T, H), expert_idx (T,) → (T, H)."""
    T = x.shape[0]
    if T == 1:  # one token (batch-1 decode): its expert alone; the sort and permutations cost ~30% of the layer
        return experts[int(expert_idx[0])](x)
    order = torch.argsort(expert_idx, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(T, device=x.device)
    counts = torch.bincount(expert_idx, minlength=len(experts)).tolist()
    xs = _PermuteRows.apply(x, order, inverse)
    if all(_plain(e) and e.activation == experts[0].activation for e in experts):
        out_sorted = grouped_mlp(xs, counts, [e.linear_fc1.weight for e in experts],
                                 [e.linear_fc2.weight for e in experts], experts[0].activation)
    else:
        # one split, not a slice per expert: each slice's backward would write a zero-filled (T, H) gradient
        # and add it up, E full passes; the split's backward is one concatenation
        outs = [experts[e](chunk) for e, chunk in enumerate(xs.split(counts)) if counts[e]]
        out_sorted = torch.cat(outs, dim=0) if outs else x.new_zeros(0, x.shape[1])
    return _PermuteRows.apply(out_sorted, inverse, order)


def _plain(expert: nn.Module) -> bool:
    """A bias-free GatedMLP of plain nn.Linear layers: what op ``grouped_mlp`` computes."""
    return (type(expert) is GatedMLP and type(expert.linear_fc1) is nn.Linear and type(expert.linear_fc2) is nn.Linear
            and expert.linear_fc1.bias is None and expert.linear_fc2.bias is None)


class MoE(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, activation: str = "silu",
                 router_train_mode: str = "sinkhorn_blackmamba"):
        super().__init__()
        self.num_experts = num_experts
        self.router_train_mode = router_train_mode
        self.router = nn.Linear(hidden_size, num_experts, bias=True)
        self.local_experts = nn.ModuleList(
            GatedMLP(hidden_size, ffn_hidden_size, activation) for _ in range(num_experts))
        # routing statistics of the last forward: tokens per expert (E,) and Sinkhorn iterations
        self.last_stats: dict | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """x (T, H) → (expert index (T,), gate (T, 1), sinkhorn iterations)."""
        logits = linear_module(self.router, x)  # (T, E)
        probs = torch.sigmoid(logits)
        iters = 0
        if self.training and self.router_train_mode != "top1":
            assignment, iters = sinkhorn(logits, _SINKHORN_VARIANT[self.router_train_mode])
            idx = assignment.argmax(dim=1)
            gate = probs.gather(1, idx.unsqueeze(1))
        else:
            gate, idx = probs.max(dim=1, keepdim=True)
            idx = idx.squeeze(1)
        return idx, gate, iters

    def forward(self, h: torch.Tensor, state=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        idx, gate, iters = self.route(x)
        # on CUDA: one grouped GEMM per expert matmul, no host sync (dispatch_sorted stays the reference)
        dispatch = dispatch_grouped if x.is_cuda and grouped_mm_supported(x) else dispatch_sorted
        out = dispatch(x, idx, self.local_experts) * gate.to(x.dtype)
        counted = idx if mask is None else idx[mask.reshape(-1).bool()]
        self.last_stats = {"tokens_per_expert": torch.bincount(counted.detach(), minlength=self.num_experts),
                           "sinkhorn_iters": iters}
        return out.reshape(shape)
