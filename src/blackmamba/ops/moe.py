"""The MoE layer's expert computation as ops: ``moe_experts`` (any number of tokens, routing given) and
``moe_step`` (a few tokens, inference routing included), plus the plain pieces they are made of.

    y = gated_mlp(x, fc1, fc2, activation)          # fc2(act(a) * b), (a, b) = split(fc1(x), [F, F]): one expert
    idx, gate = route_top1(logits)                   # inference routing: argmax of sigmoid(logits), its value
    y = moe_experts(x, expert_idx, gate, fc1s, fc2s, activation)
    # x (T, H); expert_idx (T,); gate (T, 1); fc1s / fc2s: one linear operand per expert (ops.linear.operand):
    # y[t] = gate[t] * gated_mlp(x[t], fc1s[e], fc2s[e]),  e = expert_idx[t]
    y = moe_step(h, router_w, router_b, fc1s, fc2s, activation)
    # h (b, H): route_top1 of the router's logits, then moe_experts — a decode step, no host synchronisation needed

``moe_experts`` is differentiable in x, gate and every weight; an expert with no tokens gets no gradient.
Backends of ``moe_experts``: ``reference`` sorts the tokens by expert (one stable sort; the permutation's inverse
is its backward) and runs each expert on its rows; ``cpu`` runs the sorted rows through one fused grouped kernel
(``ops/cpu/grouped_mlp.py``); ``triton`` streams each token's expert weights for a few tokens and uses
``torch._grouped_mm`` for many. ``moe_step``: ``cpu`` is one C call for up to 8 tokens, ``triton`` two kernels.
"""

from __future__ import annotations

import torch

from . import registry
from .activations import ACTIVATIONS
from .linear import apply


def gated_mlp(x: torch.Tensor, fc1, fc2, activation: str) -> torch.Tensor:
    """The release's MLP (expert and dense layer): fc2(act(a) * b) with a, b = split(fc1(x)) (gate rows first)."""
    a, b = apply(x, fc1).chunk(2, dim=-1)
    return apply(ACTIVATIONS[activation](a) * b, fc2)


def route_top1(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference routing (the released code's): (expert index (T,), gate (T, 1) = sigmoid of its logit)."""
    gate, idx = torch.sigmoid(logits).max(dim=1, keepdim=True)
    return idx.squeeze(1), gate


class PermuteRows(torch.autograd.Function):
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


def sort_by_expert(expert_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(order sorting the tokens by expert (stable), its inverse, tokens per expert as a host list)."""
    order = torch.argsort(expert_idx, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse, torch.bincount(expert_idx, minlength=num_experts).tolist()


def experts_on_sorted(xs: torch.Tensor, counts: list[int], fc1, fc2, activation: str) -> torch.Tensor:
    """Each expert's gated MLP on its rows of ``xs`` (T, H), rows grouped by expert (``counts[e]`` for expert e)."""
    # one split, not a slice per expert: each slice's backward would write a zero-filled (T, H) gradient and add
    # it up, E full passes; the split's backward is one concatenation
    outs = [gated_mlp(rows, fc1[e], fc2[e], activation) for e, rows in enumerate(xs.split(counts)) if counts[e]]
    return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[1])


def moe_experts_reference(x, expert_idx, gate, fc1, fc2, activation):
    order, inverse, counts = sort_by_expert(expert_idx, len(fc1))
    out = experts_on_sorted(PermuteRows.apply(x, order, inverse), counts, fc1, fc2, activation)
    return PermuteRows.apply(out, inverse, order) * gate.to(out.dtype)


def moe_step_reference(h, router_w, router_b, fc1, fc2, activation):
    idx, gate = route_top1(apply(h, router_w, router_b))
    return moe_experts(h, idx, gate, fc1, fc2, activation)


registry.register("moe_experts", "reference", moe_experts_reference)
registry.register("moe_step", "reference", moe_step_reference)


def _check_experts(fc1, fc2, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    if len(fc1) != len(fc2) or not fc1:
        raise ValueError(f"moe: {len(fc1)} fc1 and {len(fc2)} fc2 operands: need one of each per expert")


def _check(x, fc1, fc2, activation) -> None:
    _check_experts(fc1, fc2, activation)
    if x.dim() != 2:
        raise ValueError(f"moe: x must be (tokens, hidden), got {tuple(x.shape)}")


def moe_experts(x: torch.Tensor, expert_idx: torch.Tensor, gate: torch.Tensor, fc1, fc2, activation: str = "silu",
                backend: str | None = None) -> torch.Tensor:
    """gate[t] * expert_idx[t]'s gated MLP of x[t] for every token (see the module docstring): (T, H) → (T, H)."""
    _check(x, fc1, fc2, activation)
    _, fn = registry.resolve("moe_experts", x, backend)
    return fn(x, expert_idx, gate.reshape(-1, 1), list(fc1), list(fc2), activation)


def moe_step(h: torch.Tensor, router_w, router_b, fc1, fc2, activation: str = "silu",
             backend: str | None = None) -> torch.Tensor:
    """Inference routing and the chosen experts for a few tokens (see the module docstring): (b, H) → (b, H)."""
    _check(h, fc1, fc2, activation)
    _, fn = registry.resolve("moe_step", h, backend)
    return fn(h, router_w, router_b, fc1 if type(fc1) is list else list(fc1),
              fc2 if type(fc2) is list else list(fc2), activation)


def bind_moe_step(router_w, router_b, fc1, fc2, activation: str = "silu", backend: str | None = None):
    """``moe_step`` with its weights fixed: a callable h (b, H) → (b, H) computing
    ``moe_step(h, router_w, router_b, fc1, fc2, activation)``, valid while the weights are neither replaced nor
    moved; the backend's own ``bind`` where it has one (ops/registry.py: Binding)."""
    fc1, fc2 = list(fc1), list(fc2)
    _check_experts(fc1, fc2, activation)
    # (a router that is a module, not a weight, is no kernel's: the op as it is)
    name, bind = registry.binder("moe_step", router_w, backend) if torch.is_tensor(router_w) else (backend, None)
    if bind is not None:
        return bind(router_w, router_b, fc1, fc2, activation)
    return lambda h: moe_step(h, router_w, router_b, fc1, fc2, activation, backend=name)
