"""The Triton residual add + RMSNorm against op ``add_rmsnorm``'s reference."""

import pytest
import torch

from support.triton_interpreter import DEVICE, requires_triton  # noqa: I001  (must precede the kernels)

from blackmamba.ops.norm import add_rmsnorm_reference

pytestmark = requires_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp32_residual", [True, False])
@pytest.mark.parametrize("first_block", [True, False])
def test_add_rmsnorm_matches_block_entry(dtype, fp32_residual, first_block):
    from blackmamba.ops.triton.norm import add_rmsnorm

    g = torch.Generator().manual_seed(0)
    H = 40  # not a power of two
    weight = (torch.rand(H, generator=g) + 0.5).to(dtype).to(DEVICE)
    h = torch.randn(3, H, generator=g).to(dtype).to(DEVICE)
    res_dtype = torch.float32 if fp32_residual else dtype
    residual = None if first_block else (torch.randn(3, H, generator=g) * 3).to(res_dtype).to(DEVICE)
    with torch.no_grad():
        out, res = add_rmsnorm(h, residual, weight, 1e-5, res_dtype)
        ref_out, ref_res = add_rmsnorm_reference(h, residual, weight, 1e-5, res_dtype)
    assert out.dtype == dtype and res.dtype == ref_res.dtype
    # the interpreter rounds fp32 -> bf16 toward zero; the GPU rounds to nearest like torch: one bf16 ulp
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(res, ref_res, **tol)
    torch.testing.assert_close(out, ref_out, **tol)


def test_add_rmsnorm_rejects_mismatched_shapes():
    from blackmamba.ops.triton.norm import add_rmsnorm

    with pytest.raises(ValueError, match="add_rmsnorm"):
        add_rmsnorm(torch.zeros(2, 8, device=DEVICE), None, torch.ones(7, device=DEVICE), 1e-5, torch.float32)


def test_triton_backend_of_the_op_takes_any_leading_shape_and_defers_for_gradients():
    from blackmamba.ops.triton import _add_rmsnorm

    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 3, 40, generator=g).to(DEVICE)
    residual = torch.randn(2, 3, 40, generator=g).to(DEVICE)
    weight = (torch.rand(40, generator=g) + 0.5).to(DEVICE)
    with torch.no_grad():
        out, res = _add_rmsnorm(h, residual, weight, 1e-5, torch.float32)
        ref_out, ref_res = add_rmsnorm_reference(h, residual, weight, 1e-5, torch.float32)
    assert out.shape == h.shape and res.shape == h.shape
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
    weight.requires_grad_()
    out, _ = _add_rmsnorm(h, residual, weight, 1e-5, torch.float32)
    out.sum().backward()  # the reference ran: the kernel has no backward
    assert weight.grad is not None
