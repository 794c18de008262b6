"""The fused CPU causal conv (backend ``cpu`` of op ``conv``) against the reference, gradients included."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blackmamba.ops.cpu import build as cpu
from blackmamba.ops.conv import causal_conv1d

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the cpu backend is unavailable")


def conv_and_grads(backend, x, w, bias, init, seed=0):
    ins = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, bias, init)]
    y, final = causal_conv1d(*ins, backend=backend)
    g = torch.Generator().manual_seed(seed)
    loss = (y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64)).sum()
    if final.numel():
        loss = loss + (final.double() * torch.randn(final.shape, generator=g, dtype=torch.float64)).sum()
    given_ = [t for t in ins if t is not None]
    if not loss.requires_grad:  # an empty sequence without initial state depends on nothing
        return y, final, [torch.zeros_like(t) for t in given_]
    grads = torch.autograd.grad(loss, given_, allow_unused=True)
    return y, final, [torch.zeros_like(t) if gr is None else gr for t, gr in zip(given_, grads)]


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), l=st.integers(0, 40), d=st.integers(1, 70), K=st.integers(1, 5), init=st.booleans(),
       bias=st.booleans())
def test_matches_reference(b, l, d, K, init, bias):
    g = torch.Generator().manual_seed(b * 100 + l * 7 + d)
    x = torch.randn(b, l, d, generator=g)
    w = torch.randn(d, K, generator=g)
    bv = torch.randn(d, generator=g) if bias else None
    s0 = torch.randn(b, d, K - 1, generator=g) if init else None
    y, f, gr = conv_and_grads("cpu", x, w, bv, s0)
    y_ref, f_ref, gr_ref = conv_and_grads("reference", x, w, bv, s0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f, f_ref, rtol=0, atol=0)
    for a, r in zip(gr, gr_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_strided_bfloat16_input_as_in_the_mixer():
    xz = torch.randn(2, 30, 2 * 48).to(torch.bfloat16)
    x = xz[..., :48]  # a split view: row stride 96
    w, bias, s0 = torch.randn(48, 4), torch.randn(48), torch.randn(2, 48, 3).to(torch.bfloat16)
    y, f, gr = conv_and_grads("cpu", x, w, bias, s0)
    y_ref, f_ref, gr_ref = conv_and_grads("reference", x, w, bias, s0)
    assert y.dtype == f.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=3e-2)  # ref rounds the products
    torch.testing.assert_close(f, f_ref, rtol=0, atol=0)
    for a, r in zip(gr, gr_ref):
        torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=5e-2)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    ins = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
           for s in ((2, 6, 5), (5, 4), (5,), (2, 5, 3))]
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d(*a, backend="cpu"), ins)
