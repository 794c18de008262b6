"""FSDP2 and expert parallelism on 2 gloo processes against one process: the gradients of a step where the ranks
use different experts (rank 1 has a single token, so most experts get none of its tokens) equal those of one
process over both ranks' inputs. This is the case that breaks when experts are sharded one FSDP unit each, or
when an expert unused on one rank is left out of its reduce-scatter."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.distributed import spawn

from blackmamba import BlackMambaConfig
from blackmamba.model import BlackMambaLM

CFG = dict(layers=["r", "4", "r", "4"], hidden_size=32, ffn_hidden_size=64, vocab_size=64)


def _inputs() -> list[torch.Tensor]:
    """Rank 0: 48 tokens over every expert; rank 1: one token, one expert per layer; ranks 2, 3 (of 4): 10, 3."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 24), generator=g)
    return [ids, ids[:1, 5:6], ids[1:, 3:13], ids[:1, 20:23]]


def _model() -> BlackMambaLM:
    torch.manual_seed(0)
    return BlackMambaLM(BlackMambaConfig(**CFG))


def _worker(rank: int, ep: int, checkpointing: bool, out: str) -> None:
    from torch.distributed.fsdp import FSDPModule

    from blackmamba.layers.mlp import GatedMLP
    from blackmamba.parallel.apply import parallelize
    from blackmamba.parallel.expert import global_name
    from blackmamba.parallel.world import World

    world = World.from_env(torch.device("cpu"), ep=ep, timeout_s=60)
    model = _model()
    if checkpointing:  # wrapped before FSDP shards the blocks, as the trainer does
        from blackmamba.train.precision import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    parallelize(model, world, "local")
    model.eval()  # inference routing (top-1): each rank's experts depend on its own tokens only
    ids = _inputs()[rank]
    model(ids, targets=ids).loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[global_name(model, name).replace("_checkpoint_wrapped_module.", "")] = g.contiguous()
    per_expert = [n for n, m in model.named_modules() if isinstance(m, FSDPModule) and isinstance(m, GatedMLP)]
    assert not per_expert, per_expert
    save_file(grads, f"{out}/rank{rank}.safetensors")
    world.close()


@pytest.mark.parametrize("ranks,ep,checkpointing", [(2, 1, False), (2, 2, False), (2, 2, True), (4, 2, False)])
def test_ranks_with_different_experts_give_one_process_gradients(tmp_path, ranks, ep, checkpointing):
    """(4, 2): the experts of each expert-parallel position are themselves FSDP-sharded over 2 ranks."""
    spawn(_worker, ep, checkpointing, str(tmp_path), nprocs=ranks)
    ref = _model()
    ref.eval()
    losses = [ref(x, targets=x).loss for x in _inputs()[:ranks]]
    (sum(losses) / ranks).backward()  # FSDP averages the ranks' gradients
    got = {}
    for r in range(ranks):
        got.update({k: v for k, v in load_file(str(tmp_path / f"rank{r}.safetensors")).items() if k not in got})
    want = {n: p.grad for n, p in ref.named_parameters()}
    assert set(got) == set(want)
    unused_on_rank1 = 0
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
        unused_on_rank1 += "local_experts" in name
    assert unused_on_rank1 == 2 * 4 * 2  # 2 MoE layers × 4 experts × (fc1, fc2): every expert checked


def _model_without_expert_3() -> BlackMambaLM:
    m = _model()
    with torch.no_grad():
        for blk in m.decoder.layers:
            if blk.kind == "moe":
                blk.mixer.router.bias[3] = -100.0  # no token ever chooses expert 3
    return m


def _adamw_step(model, inputs, world=None):
    from blackmamba.parallel.apply import clip_grad_norm, drop_unused_expert_grads
    from blackmamba.train.config import OptimConfig
    from blackmamba.train.optim import build_optimizer

    # eps large enough that Adam's first step (g / |g|) is not decided by rounding in near-zero gradients
    opt = build_optimizer(model, OptimConfig(lr=1e-2, eps=1e-3), torch.device("cpu"))
    model.eval()
    model(inputs, targets=inputs).loss.backward()
    if world is not None:
        counts = {s["layer"]: world.sum(s["tokens_per_expert"].clone()) for s in model.routing_stats()}
        drop_unused_expert_grads(model, counts)
        clip_grad_norm([p for p in model.parameters()], 1.0, world)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def _step_worker(rank: int, ep: int, out: str) -> None:
    from blackmamba.parallel.apply import parallelize
    from blackmamba.parallel.expert import global_name
    from blackmamba.parallel.world import World

    world = World.from_env(torch.device("cpu"), ep=ep, timeout_s=60)
    model = _model_without_expert_3()
    parallelize(model, world, "local")
    _adamw_step(model, _inputs()[0][rank:rank + 1], world)  # each rank one of the two rows
    weights = {global_name(model, n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().contiguous()
               for n, p in model.named_parameters()}
    save_file(weights, f"{out}/rank{rank}.safetensors")
    world.close()


@pytest.mark.parametrize("ep", [1, 2])
def test_an_expert_no_rank_used_is_left_alone_as_on_one_process(tmp_path, ep):
    """One process leaves an unused expert's gradient None and AdamW skips it; FSDP reduce-scatters zeros, which
    AdamW would apply (weight decay): the step drops them."""
    spawn(_step_worker, ep, str(tmp_path))
    ref = _model_without_expert_3()
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    _adamw_step(ref, _inputs()[0])
    got = {}
    for r in range(2):
        got.update({k: v for k, v in load_file(str(tmp_path / f"rank{r}.safetensors")).items() if k not in got})
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)
        if "local_experts.3." in name:
            assert torch.equal(got[name], before[name]), name  # untouched: no decay, no momentum
