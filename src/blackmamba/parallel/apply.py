"""Parallelism applied to a built (and, if asked, activation-checkpointed) model, in torchtitan's order:

    parallelize(model, world, sinkhorn_scope="global")
        1. expert parallelism (world.ep > 1): each rank keeps its share of every MoE layer's experts
        2. the data-parallel Sinkhorn (scope "global"; "local" keeps Megatron's per-rank balancing)
        3. FSDP2: ``fully_shard`` on every block, then on the root (embedding, final norm, head)
    clip_grad_norm(params, max_norm, world)   # the global gradient norm over every rank's shards

FSDP2 details that matter for a mixture of experts:

- A MoE layer's experts are never given one ``fully_shard`` each: a rank all-gathers an FSDP unit when its module
  runs, and which experts run depends on the data, so two ranks would enter same-shaped all-gathers of different
  experts and pair them up silently. The experts belong to their block's unit (one all-gather for the whole
  layer); with expert parallelism, a rank's local experts form one unit over the ranks holding the same experts
  (``world.edp_mesh``), inside the block's.
- An expert that got no tokens on one rank has no gradient there but one on another rank; FSDP is told to
  reduce-scatter zeros for it (``set_reduce_scatter_unused_params``) so every rank enters the same
  reduce-scatters.
- Gradients are averaged over all ranks: each rank's loss is the mean over its equal share of the global batch,
  so the average is the gradient of the global mean. An expert's gradient already sums every rank's tokens
  (the token exchange's backward), so its unit divides by the world size, not by its own group's.
- Mixed precision stays torch autocast (``train.precision``), as on one process: the sharded parameters are fp32
  master weights and the all-gathers move fp32. FSDP's bf16 parameter policy would also cast A_log and D, which
  the selective scan must read in fp32, and would make N processes compute differently from one.
"""

from __future__ import annotations

import math
import warnings

import torch

from .expert import gather_balance, moe_layers, shard_experts
from .world import World

def parallelize(model, world: World, sinkhorn_scope: str = "global") -> None:
    """Apply expert parallelism, the data-parallel Sinkhorn and FSDP2 to ``model`` in place (see the module
    docstring); nothing changes in a one-process world."""
    if not world.distributed:
        return
    from torch.distributed.fsdp import fully_shard

    # a block returns views (reshapes of its outputs); FSDP warns that an in-place op on one would skip its
    # backward hook — the residual stream only ever adds out of place (op add_rmsnorm)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if world.ep > 1:
        shard_experts(model, world.ep_mesh)
    if sinkhorn_scope == "global":
        gather_balance(model, world.mesh)
    for blk in model.decoder.layers:
        if world.ep > 1:
            for moe in moe_layers(blk):
                fully_shard(moe.local_experts, mesh=world.edp_mesh)
                moe.local_experts.set_gradient_divide_factor(float(world.size))
                if world.device.type != "cuda" and world.edp_mesh.size() > 1:
                    # gloo has no pre-multiplied sum: sum, then divide (one rank already just divides)
                    moe.local_experts.set_force_sum_reduction_for_comms(True)
        fully_shard(blk, mesh=world.mesh)
    fully_shard(model, mesh=world.mesh)
    model.set_reduce_scatter_unused_params(True)


def drop_unused_expert_grads(model, tokens_per_expert: dict[int, torch.Tensor]) -> None:
    """Set to None the gradients of the experts no rank sent a token this step, as one process leaves them: FSDP
    reduce-scatters zeros for them, and AdamW would take a zero gradient as one (moving them by their momentum
    and weight decay) where it skips a missing one. ``tokens_per_expert``: per block index, the (E,) token counts
    of the step summed over micro-batches and ranks (the same on every rank)."""
    for i, counts in tokens_per_expert.items():
        (moe,) = moe_layers(model.decoder.layers[i])
        offset = getattr(moe.local_experts, "expert_offset", 0)
        for j, expert in enumerate(moe.local_experts):
            if int(counts[offset + j]) == 0:
                for p in expert.parameters():
                    p.grad = None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def clip_grad_norm(params, max_norm: float, world: World) -> float:
    """Scale the gradients so that their global 2-norm is at most ``max_norm`` (``math.inf``: no scaling); returns
    the norm before scaling. Sharded gradients (DTensors) hold every element on exactly one rank — FSDP shards
    the rest over all ranks, each expert lives on one expert-parallel rank, sharded over its group — so the norm
    is the square root of the sum over ranks of each rank's local sum of squares."""
    if not world.distributed:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    local = [_local(p.grad) for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64, device=world.comm_device)
    for g in local:
        sq += g.detach().double().pow(2).sum().to(sq.device)
    norm = math.sqrt(float(world.sum(sq)))
    coef = max_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_ computes it
    if coef < 1:
        torch._foreach_mul_(local, coef)
    return norm
