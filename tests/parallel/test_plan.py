"""The training plan (``blackmamba.parallel.plan``): the shards, buffers and bytes moved that the module docstring
states, counted here independently from a built model's parameters, and the layouts it refuses."""

import math
import re

import pytest

from blackmamba.config import BlackMambaConfig, ConfigError, preset
from blackmamba.model import BlackMambaLM
from blackmamba.parallel.plan import describe_plan, fsdp_units, plan_training
from blackmamba.train.config import RunConfig
from blackmamba.train.memory import estimate_training_bytes

# every layer kind, an untied head and sizes that do not divide evenly over the ranks (padded shards)
CUSTOM = dict(layers=["r", "8", "a", "1", "r", "4"], hidden_size=24, vocab_size=100, ffn_hidden_size=40,
              state_size=6, num_heads=4, tie_embeddings=False, max_seq_len=64)


def _params(cfg):
    """(root, blocks, experts) as {name: shape} of a built model; experts: {layer: {expert: [shapes]}}."""
    root, blocks, experts = {}, {}, {}
    for name, p in BlackMambaLM(cfg).named_parameters():
        if name.startswith("decoder.layers."):
            i, rest = name[len("decoder.layers."):].split(".", 1)
            if ".local_experts." in rest:
                e = int(rest.split(".local_experts.")[1].split(".")[0])
                experts.setdefault(int(i), {}).setdefault(e, []).append(tuple(p.shape))
            else:
                blocks.setdefault(int(i), []).append(tuple(p.shape))
        else:
            root[name] = tuple(p.shape)
    return root, blocks, experts


def _shard(shape, G):
    return math.ceil(shape[0] / G) * math.prod(shape[1:])  # FSDP2: ceil(d0 / G) rows on rank 0


def _expected_params(cfg, N, ep):
    """Bytes of rank 0's shards: every non-expert tensor over N ranks; rank 0's experts (the first E / ep of each
    MoE layer) over N / ep ranks, or all experts over N without expert parallelism."""
    root, blocks, experts = _params(cfg)
    n = sum(_shard(s, N) for s in root.values()) + sum(_shard(s, N) for b in blocks.values() for s in b)
    for by_expert in experts.values():
        kept = range(len(by_expert) // ep) if ep > 1 else range(len(by_expert))
        n += sum(_shard(s, N // ep if ep > 1 else N) for e in kept for s in by_expert[e])
    return 4 * n


@pytest.mark.parametrize("cfg", [preset("tiny"), BlackMambaConfig(**CUSTOM)], ids=["tiny", "custom"])
def test_units_hold_exactly_the_models_parameters(cfg):
    root, blocks, experts = _params(cfg)
    units = {u.name: u for u in fsdp_units(cfg, 4, 2)}
    assert sorted(units["root"].shapes) == sorted(root.values())
    for i, shapes in blocks.items():
        assert sorted(units[f"layers.{i}"].shapes) == sorted(shapes)
        assert units[f"layers.{i}"].group == 4 and units[f"layers.{i}"].gathers == 2
    for i, by_expert in experts.items():  # ep 2: half the experts, over 4 / 2 ranks
        local = [s for e in range(len(by_expert) // 2) for s in by_expert[e]]
        assert sorted(units[f"layers.{i}.experts"].shapes) == sorted(local)
        assert units[f"layers.{i}.experts"].group == 2
    assert units["root"].gathers == 1
    # without expert parallelism the experts are part of their block's unit
    units = {u.name: u for u in fsdp_units(cfg, 4, 1)}
    for i, by_expert in experts.items():
        assert sorted(units[f"layers.{i}"].shapes) == sorted(blocks[i] + [s for v in by_expert.values() for s in v])
    assert not any(name.endswith(".experts") for name in units)


@pytest.mark.parametrize("cfg", [preset("tiny"), BlackMambaConfig(**CUSTOM)], ids=["tiny", "custom"])
@pytest.mark.parametrize("N,ep", [(1, 1), (2, 1), (4, 1), (4, 2), (4, 4), (8, 2), (16, 4)])
def test_params_per_rank_are_the_exact_shards(cfg, N, ep):
    p = plan_training(cfg, world_size=N, ep=ep, batch=N, seq=8)
    assert p.params == _expected_params(cfg, N, ep)
    assert p.grads == p.params and p.optimizer == 2 * p.params
    assert p.total == 4 * p.params + p.activations + p.working + p.gather_buffer


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_one_rank_is_the_single_process_estimate_with_nothing_moved(dtype, ckpt):
    cfg = preset("tiny")
    p = plan_training(cfg, world_size=1, batch=4, seq=32, dtype=dtype, activation_checkpointing=ckpt)
    assert p.all_gather == p.reduce_scatter == p.all_to_all == p.sinkhorn_gather == p.comm_total == 0
    assert p.gather_buffer == 0
    rc = RunConfig(preset="tiny")
    rc.data.seq_len, rc.optim.batch_size = 32, 4
    rc.train.precision, rc.train.activation_checkpointing = dtype, ckpt
    est = estimate_training_bytes(rc, None, "cuda")
    assert (p.params, p.grads, p.optimizer) == (est.parameters, est.gradients, est.optimizer)
    assert (p.activations, p.working) == (est.activations, est.transient)


def test_activations_are_those_of_the_local_batch():
    cfg = preset("tiny")
    one = plan_training(cfg, world_size=1, batch=2, seq=32, dtype="fp32")
    four = plan_training(cfg, world_size=4, batch=8, seq=32, dtype="fp32")
    assert four.activations == one.activations  # 2 windows per rank either way


def test_doubling_the_ranks_halves_the_state_and_gathers_approach_twice_the_parameters():
    cfg = preset("blackmamba-1.5b")
    P = sum(u.numel for u in fsdp_units(cfg, 1))
    root = fsdp_units(cfg, 1)[0].numel
    prev = None
    for N in (8, 16, 32, 64):
        p = plan_training(cfg, world_size=N, batch=N, seq=2048)
        if prev is not None:
            assert p.params == pytest.approx(prev.params / 2, rel=2e-3)
            assert p.optimizer == pytest.approx(prev.optimizer / 2, rel=2e-3)
        # blocks twice (forward, backward), the root once: (N-1)/N of 2 P - root, received; up to the padding of
        # tensors with fewer rows than ranks per shard (the routers' 8 rows: 0.1% at N = 64)
        assert p.all_gather == pytest.approx(4 * (N - 1) / N * (2 * P - root), rel=2e-3)
        assert p.reduce_scatter == pytest.approx(4 * (N - 1) / N * P, rel=2e-3)
        if prev is not None:
            assert prev.all_gather < p.all_gather
        prev = p
    assert 1.9 < prev.all_gather / (4 * P) < 2
    # every micro-batch gathers and reduce-scatters again
    acc = plan_training(cfg, world_size=64, batch=64, seq=2048, grad_accum=3)
    assert (acc.all_gather, acc.reduce_scatter) == (3 * prev.all_gather, 3 * prev.reduce_scatter)


def test_expert_parallelism_divides_the_gathered_experts_and_exchanges_tokens():
    cfg = preset("tiny")  # 2 MoE layers of 4 experts, hidden 32
    N, B, L = 4, 8, 16
    T = B // N * L
    one = plan_training(cfg, world_size=N, ep=1, batch=B, seq=L)
    experts = {u.name: u.numel for u in fsdp_units(cfg, N, 1)}
    for ep in (2, 4):
        p = plan_training(cfg, world_size=N, ep=ep, batch=B, seq=L)
        units = {u.name: u for u in fsdp_units(cfg, N, ep)}
        expert_units = [u for name, u in units.items() if name.endswith(".experts")]
        assert len(expert_units) == 2 and all(u.group == N // ep for u in expert_units)
        # the experts a rank computes with (and gathers) divide by ep; what it stores stays E / N experts' worth
        per_layer = 4 * 3 * cfg.ffn_hidden_size * cfg.hidden_size
        assert all(u.numel == per_layer // ep for u in expert_units)
        assert experts["layers.1"] - units["layers.1"].numel == per_layer
        assert p.gather_buffer < one.gather_buffer and p.all_gather < one.all_gather
        # dispatch + combine, forward and backward, per MoE layer; (ep-1)/ep of the tokens leave the rank
        assert p.all_to_all == 2 * 4 * T * cfg.hidden_size * 4 * (ep - 1) // ep > 0
        ckpt = plan_training(cfg, world_size=N, ep=ep, batch=B, seq=L, activation_checkpointing=True)
        assert ckpt.all_to_all == 2 * 6 * T * cfg.hidden_size * 4 * (ep - 1) // ep  # the recompute's two more
    assert one.all_to_all == 0
    # Sinkhorn: each MoE layer's forward gathers the other ranks' (T, E) fp32 logits; its recompute again
    assert one.sinkhorn_gather == 2 * (N - 1) * T * 4 * 4
    assert plan_training(cfg, world_size=N, batch=B, seq=L, activation_checkpointing=True).sinkhorn_gather \
        == 2 * one.sinkhorn_gather
    top1 = preset("tiny", router_train_mode="top1")
    assert plan_training(top1, world_size=N, batch=B, seq=L).sinkhorn_gather == 0


def test_gather_buffer_is_the_root_and_three_of_the_largest_block():
    cfg = preset("tiny")
    units = fsdp_units(cfg, 2, 1)
    root = units[0].padded
    block = max(u.padded for u in units[1:])
    assert plan_training(cfg, world_size=2, batch=2, seq=8).gather_buffer == 4 * max(root + 3 * block, 2 * root)


@pytest.mark.parametrize("kwargs,problem", [
    (dict(world_size=0), "world_size = 0: must be an integer >= 1"),
    (dict(ep=0), "ep = 0: must be an integer >= 1"),
    (dict(ep=3), "ep = 3 does not divide world_size = 4"),
    (dict(world_size=8, batch=8, ep=8), "ep = 8 does not divide the 4 experts of MoE layer 1"),
    (dict(batch=6), "batch = 6 windows do not split over world_size = 4 ranks"),
    (dict(seq=0), "seq = 0: must be an integer >= 1"),
    (dict(grad_accum=0), "grad_accum = 0: must be an integer >= 1"),
    (dict(dtype="fp16"), "dtype = 'fp16': must be one of fp32, bf16"),
    (dict(world_size=True), "world_size = True: must be an integer >= 1"),
])
def test_impossible_layouts_are_refused_naming_the_problem(kwargs, problem):
    args = dict(world_size=4, batch=4, seq=8) | kwargs
    with pytest.raises(ConfigError, match="^" + re.escape(problem)) as info:
        plan_training(preset("tiny"), **args)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="no MoE layer"):
        plan_training(preset("tiny", layers=["r", "1"]), world_size=2, ep=2, batch=2, seq=8)


def test_describe_plan_is_an_aligned_table():
    text = describe_plan(plan_training(preset("blackmamba-1.5b"), world_size=8, ep=8, batch=16, seq=2048,
                                       activation_checkpointing=True))
    lines = text.splitlines()
    assert lines[0].startswith("plan            8 ranks (ep 8: a 1 × 8 mesh), bf16 activations")
    assert "micro-batches of 16 windows × 2048 tokens (2 per rank), grad_accum 1" in lines[1]
    rows = [line for line in lines[2:] if line.startswith("  ")]
    assert len(rows) == 12 and len({len(line) for line in rows}) == 1  # right-aligned columns
    assert all(line.endswith(("GB", "MB", "kB")) for line in rows)
    assert any(line.startswith("  all-to-all (expert tokens)") for line in rows)
