"""Expert parallelism and the data-parallel Sinkhorn, applied to a model's MoE layers from outside.

Expert parallelism (``shard_experts``): with an expert-parallel group of E_p ranks, the rank at position c in it
keeps experts [c E/E_p, (c+1) E/E_p) of every MoE layer (each rank still routes its own tokens over all E). The
call of ``MoE.local_experts`` is wrapped so that it

    1. sorts its tokens by expert and counts them (E,), and exchanges the counts (all-to-all of E integers),
    2. sends each token to the rank that holds its expert (``all_to_all_single``, uneven splits),
    3. runs the received tokens through the local experts (op ``moe_experts``, as on one process),
    4. sends the results back (the inverse all-to-all) and puts them in the tokens' order; the gate is applied
       on the token's own rank, as without parallelism.

The two token exchanges are autograd functions (functional collectives): their backward is the reverse
all-to-all, so every expert's gradient sums the contributions of every rank's tokens. Only the list form of
``all_to_all`` fails on gloo with uneven sizes; ``all_to_all_single`` takes them.

Checkpoint names stay global: the local expert i of ep position c is saved as expert c E/E_p + i
(``global_name``), so a checkpoint does not depend on E_p.

Sinkhorn over the data-parallel group (``gather_balance``): each rank holds a slice of the global batch; the
router logits of every rank (T × E floats per rank) are all-gathered in rank order and balanced together, so the
balancing sees the same token set as one process training on the whole batch; each rank keeps its own rows.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..layers.moe import MoE
from ..ops.moe import PermuteRows, sort_by_expert
from ..ops.sinkhorn import sinkhorn

_EXPERT = re.compile(r"^(.*\.local_experts\.)(\d+)(\..*)$")


def moe_layers(model) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


class ExpertExchange:
    """The pre- and post-hooks of one ``Experts`` call under expert parallelism (see the module docstring)."""

    def __init__(self, num_experts: int, group, ep_size: int):
        self.E, self.group, self.P = num_experts, group, ep_size
        self.local = num_experts // ep_size
        self._ctx: list = []  # one entry per call in flight (a checkpointed block's recompute nests nothing)

    def before(self, module, args):
        x, idx, gate = args  # (T, H), (T,) global expert indices, (T, 1)
        order, inverse, counts = sort_by_expert(idx, self.E)
        xs = PermuteRows.apply(x, order, inverse)  # tokens grouped by expert, experts in rank order
        send = torch.tensor(counts, dtype=torch.int64, device=x.device)  # (E,) tokens this rank sends per expert
        recv = torch.empty_like(send)  # (P * local,): per source rank, its tokens for each of my experts
        dist.all_to_all_single(recv, send, group=self.group)
        send_splits = send.view(self.P, self.local).sum(1).tolist()
        recv_counts = recv.view(self.P, self.local)
        recv_splits = recv_counts.sum(1).tolist()
        xr = all_to_all_single_autograd(xs, recv_splits, send_splits, self.group)  # (received, H)
        local_idx = torch.arange(self.local, device=x.device).repeat(self.P).repeat_interleave(
            recv_counts.reshape(-1))  # each received token's local expert
        self._ctx.append((order, inverse, send_splits, recv_splits, gate))
        return xr, local_idx, torch.ones(xr.shape[0], 1, dtype=gate.dtype, device=gate.device)

    def after(self, module, args, out):
        order, inverse, send_splits, recv_splits, gate = self._ctx.pop()
        ys = all_to_all_single_autograd(out, send_splits, recv_splits, self.group)  # back, in sorted order
        return PermuteRows.apply(ys, inverse, order) * gate.to(ys.dtype)


def shard_experts(model, ep_mesh) -> None:
    """Keep this rank's experts of every MoE layer and route tokens to the others' (see the module docstring)."""
    P, c = ep_mesh.size(), ep_mesh.get_local_rank()
    group = ep_mesh.get_group()
    for moe in moe_layers(model):
        E = moe.num_experts
        if E % P:
            raise ValueError(f"parallel.ep = {P} does not divide the {E} experts of a MoE layer")
        n = E // P
        del moe.local_experts[(c + 1) * n:]  # keep experts [c n, (c + 1) n)
        del moe.local_experts[:c * n]
        moe.local_experts.expert_offset = c * n
        exchange = ExpertExchange(E, group, P)
        moe.local_experts.register_forward_pre_hook(exchange.before)
        moe.local_experts.register_forward_hook(exchange.after)


def global_name(model, name: str) -> str:
    """A parameter name with the local expert index made global (unchanged without expert parallelism)."""
    m = _EXPERT.match(name)
    if m is None:
        return name
    experts = model.get_submodule(m.group(1)[:-1])
    return f"{m.group(1)}{int(m.group(2)) + getattr(experts, 'expert_offset', 0)}{m.group(3)}"


def gather_balance(model, mesh) -> None:
    """Make every MoE layer's Sinkhorn balance the router logits of all the ranks of ``mesh`` together."""
    group, rank = mesh.get_group(), mesh.get_local_rank()

    def balance(logits: torch.Tensor, variant: str, stop: str = "delta"):
        local = logits.detach().float().contiguous()  # (T, E); every rank has the same T
        full = local.new_empty(mesh.size() * local.shape[0], local.shape[1])  # (N T, E), rank order
        dist.all_gather_single(full, local, group=group)
        assignment, iters = sinkhorn(full, variant, stop=stop)
        T = logits.shape[0]
        return assignment[rank * T:(rank + 1) * T], iters

    for moe in moe_layers(model):
        moe.balance = balance
