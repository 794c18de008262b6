"""Op ``add_rmsnorm`` (the block entry): the reference against the formula, the fused CPU kernel against the
reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blackmamba.ops import add_rmsnorm
from blackmamba.ops.cpu import build as cpu

KINDS = [torch.float32, torch.bfloat16]
needs_kernels = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the cpu backend is unavailable")


def _inputs(shape, h_dtype, res_dtype, w_dtype, first, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, generator=g).to(h_dtype)
    residual = None if first else (3 * torch.randn(*shape, generator=g)).to(res_dtype)
    weight = (torch.rand(shape[-1], generator=g) + 0.5).to(w_dtype)
    return h, residual, weight


def every_dtype(test):
    """Every float32 / bfloat16 combination of h, residual and weight, in the first block and later."""
    for name in ("w_dtype", "res_dtype", "h_dtype"):
        test = pytest.mark.parametrize(name, KINDS)(test)
    return pytest.mark.parametrize("first", [True, False])(test)


@every_dtype
def test_reference_is_the_block_entry(h_dtype, res_dtype, w_dtype, first):
    """residual' = h + residual in residual_dtype; out = x · rsqrt(mean(x²) + eps) · w in fp32, x = residual' in
    the weight's dtype, returned in the weight's dtype."""
    h, residual, weight = _inputs((2, 3, 40), h_dtype, res_dtype, w_dtype, first)
    want_res = h if residual is None else h + residual
    x = want_res.to(w_dtype).double()
    want = (x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * weight.double()).to(w_dtype)
    out, res = add_rmsnorm(h, residual, weight, 1e-5, res_dtype, backend="reference")
    tol = dict(rtol=2e-7, atol=2e-7) if w_dtype == torch.float32 else dict(rtol=0, atol=0)
    torch.testing.assert_close(out, want, **tol)
    assert out.dtype == w_dtype
    assert torch.equal(res, want_res.to(res_dtype)) and res.dtype == res_dtype


@needs_kernels
@every_dtype
def test_cpu_matches_reference(h_dtype, res_dtype, w_dtype, first):
    h, residual, weight = _inputs((3, 1, 40), h_dtype, res_dtype, w_dtype, first)
    with torch.no_grad():
        out, res = add_rmsnorm(h, residual, weight, 1e-5, res_dtype, backend="cpu")
        ref_out, ref_res = add_rmsnorm(h, residual, weight, 1e-5, res_dtype, backend="reference")
    assert out.dtype == ref_out.dtype and res.dtype == ref_res.dtype and out.shape == h.shape
    assert torch.equal(res, ref_res)  # the add and its rounding are exact
    # the kernel sums x² in another order: a float32 ulp or so, or one bfloat16 rounding flipped
    tol = dict(rtol=1e-6, atol=1e-6) if w_dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 9), H=st.integers(1, 100), first=st.booleans(), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_cpu_matches_reference_any_shape(rows, H, first, seed, scale):
    h, residual, weight = _inputs((rows, H), torch.float32, torch.float32, torch.float32, first, seed)
    h = h * scale
    with torch.no_grad():
        out, res = add_rmsnorm(h, residual, weight, 1e-5, torch.float32, backend="cpu")
        ref_out, ref_res = add_rmsnorm(h, residual, weight, 1e-5, torch.float32, backend="reference")
    assert torch.equal(res, ref_res)
    torch.testing.assert_close(out, ref_out, rtol=2e-6, atol=2e-6)


@needs_kernels
def test_cpu_keeps_the_gradient_path():
    h, residual, weight = _inputs((2, 8), torch.float32, torch.float32, torch.float32, False)
    weight.requires_grad_()
    out, _ = add_rmsnorm(h, residual, weight, 1e-5, torch.float32, backend="cpu")
    out.sum().backward()  # a gradient is needed: the reference ran, so this backpropagates
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="add_rmsnorm"):
        add_rmsnorm(torch.zeros(2, 8), None, torch.ones(7), 1e-5, torch.float32)
    with pytest.raises(ValueError, match="add_rmsnorm"):
        add_rmsnorm(torch.zeros(2, 8), torch.zeros(3, 8), torch.ones(8), 1e-5, torch.float32)
