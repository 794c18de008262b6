"""MoE: sort-based dispatch vs a naive per-token loop; Sinkhorn marginals; train vs eval routing."""

import pytest
import torch

from blackmamba.layers import MoE
from blackmamba.ops import sinkhorn


def naive_moe(moe: MoE, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    logits = moe.router(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):  # one token at a time
        e = int(idx[t])
        out[t] = moe.local_experts[e](x[t:t + 1])[0] * torch.sigmoid(logits[t, e])
    return out


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_eval_dispatch_equals_naive_loop(activation):
    torch.manual_seed(0)
    moe = MoE(16, 24, 5, activation).eval()
    with torch.no_grad():
        moe.router.weight.mul_(10)
    x = torch.randn(3, 20, 16)
    with torch.no_grad():
        out = moe(x)
        idx = torch.sigmoid(moe.router(x.reshape(-1, 16))).argmax(1)
        assert len(set(idx.tolist())) >= 3  # several experts are really used
        expect = naive_moe(moe, x.reshape(-1, 16), idx).reshape(x.shape)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)
    assert moe.last_stats["tokens_per_expert"].tolist() == torch.bincount(idx, minlength=5).tolist()


def test_one_token_dispatch_equals_the_sorted_path_and_backpropagates():
    torch.manual_seed(1)
    moe = MoE(16, 24, 5).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        batch = moe(x.unsqueeze(1))[:, 0]  # four tokens: sorted dispatch
        alone = torch.cat([moe(x[t:t + 1].unsqueeze(1))[:, 0] for t in range(4)])  # one at a time: the shortcut
    torch.testing.assert_close(alone, batch, rtol=1e-6, atol=1e-7)
    xg = x[:1].clone().requires_grad_()
    moe(xg.unsqueeze(1)).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_backward_cost_does_not_grow_with_experts_times_tokens():
    """The dispatch's backward writes no full-size (T, H) zero gradient per expert (what slicing the
    sorted tokens once per expert did: E zero-fills and E additions of (T, H))."""
    torch.manual_seed(2)
    T, H, E = 64, 16, 8
    moe = MoE(H, 24, E).train()
    x = torch.randn(T, 1, H, requires_grad=True)
    loss = moe(x).sum()
    with torch.profiler.profile(record_shapes=True) as prof:
        loss.backward()
    full = [e.key for e in prof.events() if e.key in ("aten::fill_", "aten::zero_", "aten::add_")
            and e.input_shapes and list(e.input_shapes[0]) == [T, H]]
    assert len(full) <= 1, full  # at most one (T, H) pass (autograd's own accumulation), not E
    assert len(moe.last_stats["tokens_per_expert"].nonzero()) >= 4  # several experts really ran


@pytest.mark.parametrize("variant", ["vanilla", "blackmamba"])
def test_sinkhorn_marginals(variant):
    torch.manual_seed(1)
    T, E = 64, 8
    logits = torch.randn(T, E) + torch.linspace(0, 2, E)  # skewed towards the last experts
    assign, iters = sinkhorn(logits, variant, tol=1e-9)
    assert iters > 1
    torch.testing.assert_close(assign.sum(1), torch.full((T,), 1 / T), rtol=1e-4, atol=0)
    torch.testing.assert_close(assign.sum(0), torch.full((E,), 1 / E), rtol=1e-4, atol=0)


def test_sinkhorn_balances_better_than_argmax():
    torch.manual_seed(2)
    T, E = 4096, 8
    logits = torch.randn(T, E) + torch.linspace(0, 3, E)
    plain = torch.bincount(logits.argmax(1), minlength=E).float()
    assign, _ = sinkhorn(logits, "blackmamba")
    balanced = torch.bincount(assign.argmax(1), minlength=E).float()
    assert plain.max() / plain.mean() > 3
    assert balanced.max() / balanced.mean() < 1.5


def test_sinkhorn_survives_huge_logits():
    assign, _ = sinkhorn(torch.tensor([[100.0, 0.0], [0.0, 100.0], [90.0, 0.0]]), "blackmamba")
    assert torch.isfinite(assign).all()


def test_training_routing_uses_sinkhorn_and_sigmoid_gate():
    torch.manual_seed(3)
    moe = MoE(8, 8, 4, "silu", "sinkhorn_blackmamba")
    with torch.no_grad():
        moe.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 6.0]))  # argmax would send all tokens to expert 3
    x = torch.randn(256, 8)
    moe.eval()
    idx_eval, gate_eval, iters_eval = moe.route(x)
    assert (idx_eval == 3).float().mean() > 0.95 and iters_eval == 0
    moe.train()
    idx_train, gate_train, iters_train = moe.route(x)
    counts = torch.bincount(idx_train, minlength=4)
    assert counts.max() < 0.5 * 256 and iters_train >= 1
    logits = moe.router(x)
    torch.testing.assert_close(gate_train[:, 0], torch.sigmoid(logits.gather(1, idx_train[:, None]))[:, 0])
    # the router learns through the gate: gradients reach it
    out = moe(x.unsqueeze(0))
    out.sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0
    moe.router_train_mode = "top1"
    assert torch.equal(moe.route(x)[0], idx_eval)


def test_vanilla_sinkhorn_mode_in_training():
    torch.manual_seed(4)
    moe = MoE(8, 8, 4, "silu", "sinkhorn").train()
    idx, _, iters = moe.route(torch.randn(128, 8))
    assert iters >= 1 and idx.shape == (128,)


def test_sinkhorn_marginal_mode_routes_by_vanilla_sinkhorn_stopped_on_the_marginals():
    """router_train_mode = sinkhorn_marginal: Megatron's cost, run until every token's row of the assignment is
    within 1% of 1/T; the experts are its argmax."""
    from blackmamba.ops.sinkhorn import sinkhorn

    torch.manual_seed(0)
    moe = MoE(16, 32, 4, router_train_mode="sinkhorn_marginal").train()
    x = torch.randn(64, 16) * 3
    idx, gate, iters = moe.route(x)
    logits = torch.nn.functional.linear(x, moe.router.weight, moe.router.bias)
    plan, expected = sinkhorn(logits, "vanilla", stop="marginal")
    assert iters == expected and iters != sinkhorn(logits, "vanilla")[1]
    assert torch.equal(idx, plan.argmax(1))
    assert ((64 * plan.sum(1) - 1).abs().max()) < 1e-2
