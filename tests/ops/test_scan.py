"""The reference scan and conv: chunking with carried state, single steps, a closed-form check."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blackmamba.ops import causal_conv1d, causal_conv1d_step, selective_scan, selective_scan_step


def inputs(b, l, d, n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, d, generator=g, dtype=dtype)
    delta = torch.nn.functional.softplus(torch.randn(b, l, d, generator=g, dtype=dtype))
    A = -torch.exp(torch.randn(d, n, generator=g, dtype=dtype))
    B = torch.randn(b, l, n, generator=g, dtype=dtype)
    C = torch.randn(b, l, n, generator=g, dtype=dtype)
    D = torch.randn(d, generator=g, dtype=dtype)
    z = torch.randn(b, l, d, generator=g, dtype=dtype)
    return x, delta, A, B, C, D, z


def test_scan_matches_closed_form():
    # s_t = sum_k prod_{j=k+1..t} exp(delta_j A) * delta_k B_k x_k, written without a recurrence
    x, delta, A, B, C, D, z = inputs(2, 7, 3, 4, dtype=torch.float32)
    y, s = selective_scan(x, delta, A, B, C, D, z, backend="reference")
    b, l, d = x.shape
    cum = torch.cumsum(delta, dim=1)  # (b, l, d)
    expect_s = []
    for t in range(l):
        decay = torch.exp((cum[:, t:t + 1] - cum[:, : t + 1]).unsqueeze(-1) * A)  # (b, t+1, d, n)
        contrib = (delta[:, : t + 1] * x[:, : t + 1]).unsqueeze(-1) * B[:, : t + 1].unsqueeze(2)
        expect_s.append((decay * contrib).sum(1))
    expect_y = torch.stack([(st_ * C[:, t, None, :]).sum(-1) for t, st_ in enumerate(expect_s)], 1)
    expect_y = (expect_y + x * D) * torch.nn.functional.silu(z)
    torch.testing.assert_close(y, expect_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, expect_s[-1], rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(l=st.integers(1, 24), data=st.data(), b=st.integers(1, 3), d=st.integers(1, 6), n=st.integers(1, 5))
def test_chunked_scan_equals_one_pass(l, data, b, d, n):
    x, delta, A, B, C, D, z = inputs(b, l, d, n, seed=l * 31 + d)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, l - 1)), max_size=3)))) if l > 1 else []
    y_full, s_full = selective_scan(x, delta, A, B, C, D, z)
    ys, s = [], None
    for lo, hi in zip([0] + cuts, cuts + [l]):
        y, s = selective_scan(x[:, lo:hi], delta[:, lo:hi], A, B[:, lo:hi], C[:, lo:hi], D, z[:, lo:hi],
                              initial_state=s)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_full, rtol=1e-10, atol=1e-10)


def test_steps_equal_scan():
    x, delta, A, B, C, D, z = inputs(2, 9, 5, 3)
    y_full, s_full = selective_scan(x, delta, A, B, C, D, z)
    state = torch.zeros(2, 5, 3, dtype=torch.float64)
    ys = [selective_scan_step(x[:, t], delta[:, t], A, B[:, t], C[:, t], D, z[:, t], state) for t in range(9)]
    torch.testing.assert_close(torch.stack(ys, 1), y_full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, s_full, rtol=1e-12, atol=1e-12)


def test_zero_delta_and_x_leave_state_untouched():
    x, delta, A, B, C, D, z = inputs(1, 6, 4, 3)
    s0 = torch.randn(1, 4, 3, dtype=torch.float64)
    _, s = selective_scan(torch.zeros_like(x), torch.zeros_like(delta), A, B, C, D, z, initial_state=s0)
    torch.testing.assert_close(s, s0, rtol=0, atol=0)


def test_scan_gradients_flow_to_every_input():
    x, delta, A, B, C, D, z = [t.requires_grad_() for t in inputs(1, 5, 3, 2)]
    s0 = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    y, s = selective_scan(x, delta, A, B, C, D, z, initial_state=s0)
    (y.sum() + s.sum()).backward()
    for t in (x, delta, A, B, C, D, z, s0):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@settings(max_examples=20, deadline=None)
@given(l=st.integers(1, 12), k=st.integers(1, 5), cut=st.integers(0, 12))
def test_conv_chunked_and_stepped(l, k, cut):
    cut = min(cut, l)
    g = torch.Generator().manual_seed(l * 7 + k)
    x = torch.randn(2, l, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, k, generator=g, dtype=torch.float64)
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    y, fin = causal_conv1d(x, w, bias)
    # direct definition: y_t = bias + sum_j w[:, j] x_{t-k+1+j}
    xp = torch.nn.functional.pad(x, (0, 0, k - 1, 0))
    expect = bias + sum(xp[:, j:j + l] * w[:, j] for j in range(k))
    torch.testing.assert_close(y, expect)
    y1, s = causal_conv1d(x[:, :cut], w, bias)
    y2, s2 = causal_conv1d(x[:, cut:], w, bias, initial_state=s)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(s2, fin)
    state = torch.zeros(2, 3, k - 1, dtype=torch.float64)
    steps = torch.stack([causal_conv1d_step(x[:, t], w, bias, state) for t in range(l)], 1)
    torch.testing.assert_close(steps, y)
    torch.testing.assert_close(state, fin)


def test_shape_errors_are_clear():
    x, delta, A, B, C, D, z = inputs(1, 4, 3, 2)
    import pytest

    with pytest.raises(ValueError, match="B must be"):
        selective_scan(x, delta, A, B[:, :2], C, D, z)
    with pytest.raises(ValueError, match="initial_state must be"):
        selective_scan(x, delta, A, B, C, D, z, initial_state=torch.zeros(1, 3, 5))
