"""Sinkhorn: the release's loop unchanged, the marginal stop rule's guarantee, balance_metrics by hand, and the
one-iteration artefact of the BlackMamba variant under the release's absolute delta rule."""

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from blackmamba.ops.sinkhorn import MARGINAL_TOL, balance_metrics, sinkhorn, sinkhorn_iterates


def release_sinkhorn(logits, variant="blackmamba", tol=1e-4, eps=1e-8, max_iters=1000):
    """The released loop, written out as it was before the iterator (the reference for bit-for-bit equality)."""
    L = logits.detach().float()
    T, E = L.shape
    scale = 2.0 if variant == "blackmamba" else 1.0
    cost = torch.exp(scale * L)
    if not torch.isfinite(cost).all():
        cost = torch.exp(scale * (L - L.max()))
    d0 = torch.ones(T)
    d1 = 1.0 / (E * cost.sum(0)) if variant == "blackmamba" else torch.ones(E)
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


def logits(T, E, temperature=1.0, skew=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return temperature * torch.randn(T, E, generator=g) + skew * torch.linspace(0, 1, E)


CASES = [  # (T, E, temperature, skew, kwargs)
    (64, 8, 1.0, 2.0, {}),
    (4096, 8, 1.0, 0.0, {}),
    (300, 4, 3.0, 1.0, {"tol": 1e-9}),
    (128, 16, 0.3, 4.0, {"tol": 1e-6, "max_iters": 3}),
    (50, 2, 60.0, 0.0, {}),  # exp overflows: the shifted cost
    (10, 3, 1.0, 0.0, {"max_iters": 0}),
]


@pytest.mark.parametrize("variant", ["vanilla", "blackmamba"])
@pytest.mark.parametrize("T,E,temperature,skew,kwargs", CASES)
def test_delta_rule_is_the_release_loop_bit_for_bit(variant, T, E, temperature, skew, kwargs):
    L = logits(T, E, temperature, skew, seed=T + E)
    expect, expect_iters = release_sinkhorn(L, variant, **kwargs)
    got, iters = sinkhorn(L, variant, **kwargs)
    assert iters == expect_iters
    assert torch.equal(got, expect)
    got, iters = sinkhorn(L, variant, stop="delta", **kwargs)
    assert iters == expect_iters and torch.equal(got, expect)


def test_iterates_are_the_plans_sinkhorn_returns():
    L = logits(200, 8, 1.5, 1.0)
    for variant in ("vanilla", "blackmamba"):
        kept = []
        for it in sinkhorn_iterates(L, variant):
            kept.append((it, it.plan().clone()))
            if it.iteration == 6:
                break
        assert kept[0][0].iteration == 0 and kept[0][0].delta == float("inf")
        assert torch.equal(kept[0][0].d0, torch.ones(200))
        for k, (it, plan) in enumerate(kept):
            assert it.iteration == k
            assert torch.equal(it.plan(), plan)  # a yielded state is not modified by later iterations
            expect, n = release_sinkhorn(L, variant, tol=0.0, max_iters=k)
            assert n == k and torch.equal(plan, expect)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(2, 400), E=st.integers(2, 16), temperature=st.floats(0.05, 4.0), skew=st.floats(0.0, 3.0),
       seed=st.integers(0, 2**16), variant=st.sampled_from(["vanilla", "blackmamba"]),
       tol=st.sampled_from([None, 1e-3, 1e-4]))
@example(T=2, E=7, temperature=3.0, skew=0.0, seed=1726, variant="vanilla", tol=1e-4)  # eps sets the columns' error
def test_marginal_rule_returns_a_plan_with_the_marginals(T, E, temperature, skew, seed, variant, tol):
    L = logits(T, E, temperature, skew, seed)
    eps = 1e-8
    plan, iters = sinkhorn(L, variant, tol=tol, eps=eps, stop="marginal")
    if variant == "blackmamba":
        # eps = 1e-8 against the variant's tiny (cost d1) can stall the rows above tol (test_..._eps_floor)
        assume(iters < 1000)
    assert 1 <= iters < 1000
    m = balance_metrics(plan)
    bound = (MARGINAL_TOL if tol is None else tol) + 1e-5  # fp32 rounding of the sums
    assert m["row_err"] < bound
    # after the d1 update column e sums to 1/E times S_e / (S_e + eps), S_e = sum_t d0_t cost_te (the module
    # docstring): eps shows where a column's costs are tiny (few tokens, spread logits: T=2, E=7, temperature 3)
    last = next(it for it in sinkhorn_iterates(L, variant, eps) if it.iteration == iters)
    S = (last.d0.unsqueeze(1) * last.cost).double().sum(0)
    assert m["col_err"] < bound + (eps / (S + eps)).max().item()
    torch.testing.assert_close(plan.double().sum(1), torch.full((T,), 1 / T, dtype=torch.float64),
                               rtol=bound, atol=0)


def test_balance_metrics_by_hand():
    m = balance_metrics(torch.tensor([[0.3, 0.2], [0.1, 0.4]]))  # rows 0.5 0.5, columns 0.4 0.6, argmax 0 1
    assert m == pytest.approx({"max_load": 1.0, "row_err": 0.0, "col_err": 0.2}, abs=1e-6)
    m = balance_metrics(torch.tensor([[0.2, 0.05], [0.2, 0.05], [0.15, 0.1], [0.2, 0.05]]))  # all on expert 0
    assert m == pytest.approx({"max_load": 2.0, "row_err": 0.0, "col_err": 0.5}, abs=1e-6)
    m = balance_metrics(torch.tensor([[0.6, 0.1], [0.1, 0.2]]))  # rows 0.7 0.3 → T row = 1.4 0.6
    assert m == pytest.approx({"max_load": 1.0, "row_err": 0.4, "col_err": 0.4}, abs=1e-6)
    it = next(iter(sinkhorn_iterates(logits(30, 3), "vanilla")))
    assert balance_metrics(it) == balance_metrics(it.plan())


def test_blackmamba_stops_at_one_iteration_with_the_rows_still_off():
    """The paper's 'one iteration': the absolute delta rule on the variant's tiny d1 (measured at seed 0: row
    error 0.086 after one iteration; seeds 0-5 give 0.059-0.136), while the marginal rule needs 3 here."""
    L = logits(4096, 8, 1.0)
    plan, iters = sinkhorn(L, "blackmamba")
    assert iters == 1
    assert balance_metrics(plan)["row_err"] > 0.05
    first = next(it for it in sinkhorn_iterates(L, "blackmamba") if it.iteration == 1)
    assert first.d1.max() < 1e-4 and first.delta < 1e-6  # why: d1 ~ 1 / (E Σ exp(2L)) ≈ 4e-6
    plan, iters = sinkhorn(L, "blackmamba", stop="marginal")
    assert 1 < iters <= 5
    assert balance_metrics(plan)["row_err"] < MARGINAL_TOL
    _, vanilla_iters = sinkhorn(L, "vanilla")  # d1 ~ 1 there: the same rule is a relative one
    assert vanilla_iters > 1


def test_blackmamba_marginals_stall_at_the_eps_floor():
    """At temperature 2 the variant's (cost d1) reaches ~1e-8 for some tokens, where eps = 1e-8 biases d0: the
    row error stays above 0.1 for hundreds of iterations; with eps = 0 the same rule fires within 40."""
    L = logits(4096, 8, 2.0)
    plan, iters = sinkhorn(L, "blackmamba", stop="marginal", max_iters=200)
    assert iters == 200 and balance_metrics(plan)["row_err"] > 0.1
    plan, iters = sinkhorn(L, "blackmamba", stop="marginal", eps=0.0, max_iters=200)
    assert iters < 40 and balance_metrics(plan)["row_err"] < MARGINAL_TOL


def test_unknown_variant_or_rule():
    with pytest.raises(ValueError, match="variant"):
        sinkhorn(torch.zeros(4, 2), "megatron")
    with pytest.raises(ValueError, match="stop rule"):
        sinkhorn(torch.zeros(4, 2), stop="relative")
