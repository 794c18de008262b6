"""Triton decode kernels (conv update, SSM update) against the reference single-step ops."""

import pytest
import torch
import torch.nn.functional as F

from support.triton_interpreter import DEVICE, requires_triton  # noqa: I001  (must precede the kernels)

from blackmamba.ops.conv import causal_conv1d_step
from blackmamba.ops.scan import selective_scan_step_reference

pytestmark = requires_triton


def _t(*shape, g, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_optional", [True, False])
def test_ssm_update_matches_reference_step(dtype, with_optional):
    from blackmamba.ops.triton import _scan_step as selective_scan_step_triton

    g = torch.Generator().manual_seed(0)
    b, d, n = 3, 70, 16
    x, z = _t(b, d, g=g, dtype=dtype), _t(b, d, g=g, dtype=dtype)
    delta = F.softplus(_t(b, d, g=g))
    A = -torch.exp(_t(d, n, g=g))
    B, C = _t(b, n, g=g, dtype=dtype), _t(b, n, g=g, dtype=dtype)
    D = _t(d, g=g) if with_optional else None
    z = z if with_optional else None
    s1 = _t(b, d, n, g=g)
    s2 = s1.clone()
    y1 = selective_scan_step_triton(x, delta, A, B, C, D, z, s1)
    y2 = selective_scan_step_reference(x, delta, A, B, C, D, z, s2)
    assert y1.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y1, y2, **tol)
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)


def test_ssm_update_fused_bias_and_softplus_on_strided_views():
    from blackmamba.ops.triton.step import ssm_update

    g = torch.Generator().manual_seed(1)
    b, d, n = 2, 40, 5  # n not a power of two
    xz = _t(b, 2 * d, g=g)
    x, z = xz.split([d, d], dim=-1)
    dbc = _t(b, 3 + 2 * n, g=g)
    _, B, C = dbc.split([3, n, n], dim=-1)
    # pre-activations spanning softplus's branches (very negative, ordinary, above torch's threshold 20)
    dt = torch.cat([torch.full((b, 5), -40.0), torch.full((b, 5), 25.0), torch.randn(b, d - 10, generator=g)], 1)
    dt = dt.to(DEVICE) * 0.1
    bias = _t(d, g=g)
    A, D = -torch.rand(d, n, generator=g).to(DEVICE), _t(d, g=g)
    s1 = _t(b, d, n, g=g)
    s2 = s1.clone()
    y1 = ssm_update(s1, x, dt, A, B, C, D, z, dt_bias=bias, softplus=True)
    y2 = selective_scan_step_reference(x, F.softplus(dt + bias), A, B, C, D, z, s2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("K", [4, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_update_matches_reference_step_plus_silu(K, dtype):
    from blackmamba.ops.triton.step import conv_update

    g = torch.Generator().manual_seed(2)
    b, d = 2, 70
    xz = _t(b, 2 * d, g=g, dtype=dtype)
    x = xz[:, :d]  # a strided view, as split() gives
    w, bias = _t(d, K, g=g), _t(d, g=g)
    st1 = _t(b, d, K - 1, g=g, dtype=dtype)
    st2 = st1.clone()
    y1 = conv_update(x, w, bias, st1, silu=True)
    y2 = F.silu(causal_conv1d_step(x, w, bias, st2))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(y1, y2, **tol)
    torch.testing.assert_close(st1, st2, atol=0, rtol=0)  # the shift is exact


def test_bad_state_shape_is_a_clear_error():
    from blackmamba.ops.triton.step import conv_update, ssm_update

    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="state must be"):
        ssm_update(torch.zeros(2, 8, 3, device=DEVICE), x, x, torch.zeros(8, 4, device=DEVICE),
                   torch.zeros(2, 4, device=DEVICE), torch.zeros(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="state must be"):
        conv_update(x, torch.zeros(8, 4, device=DEVICE), None, torch.zeros(2, 8, 4, device=DEVICE))
