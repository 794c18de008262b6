"""The Triton selective scan against the fp32 reference: outputs, final states and every gradient.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (see ``support.triton_interpreter``).
"""

import torch
import torch.nn.functional as F

from support.triton_interpreter import DEVICE, requires_cuda, requires_triton  # noqa: I001  (must precede the kernels)

from blackmamba.ops import available_backends, selective_scan
from blackmamba.ops.scan import selective_scan_reference

pytestmark = requires_triton


def _inputs(b, l, d, n, dtype=torch.float32, seed=0, with_D=True, with_z=True, with_h0=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    x = r(b, l, d).to(dtype)
    delta = F.softplus(r(b, l, d) - 1.0)  # fp32, as the mixer makes it
    A = -torch.exp(r(d, n) * 0.5)
    B, C = r(b, l, n).to(dtype), r(b, l, n).to(dtype)
    D = r(d) if with_D else None
    z = r(b, l, d).to(dtype) if with_z else None
    h0 = r(b, d, n) if with_h0 else None
    out = [x, delta, A, B, C, D, z, h0]
    return [t.to(DEVICE).requires_grad_() if t is not None else None for t in out]


def _triton(*ins):
    from blackmamba.ops.triton.scan import selective_scan_triton

    return selective_scan_triton(*ins)


def _grads(fn, ins, gy, gh):
    y, h = fn(*ins)
    loss = 0
    if gy is not None:
        loss = loss + (y.float() * gy).sum()
    if gh is not None:
        loss = loss + (h * gh).sum()
    present = [t for t in ins if t is not None]
    grads = torch.autograd.grad(loss, present, allow_unused=True)  # C, D, z do not reach the final state
    return y, h, [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, present)]


NAMES = ["x", "delta", "A", "B", "C", "D", "z", "h0"]


def _check(ins, atol_y=1e-4, atol_g=1e-3, rtol=1e-4, use_y=True, use_h=True):
    gen = torch.Generator().manual_seed(1)
    b, l, d = ins[0].shape
    n = ins[2].shape[1]
    gy = torch.randn(b, l, d, generator=gen).to(DEVICE) if use_y else None
    gh = torch.randn(b, d, n, generator=gen).to(DEVICE) if use_h else None
    y1, h1, g1 = _grads(_triton, ins, gy, gh)
    y2, h2, g2 = _grads(selective_scan_reference, ins, gy, gh)
    assert y1.dtype == ins[0].dtype and y1.shape == (b, l, d)
    assert h1.dtype == torch.float32 and h1.shape == (b, d, n)
    torch.testing.assert_close(y1, y2, atol=atol_y, rtol=rtol)
    torch.testing.assert_close(h1, h2, atol=atol_y, rtol=rtol)
    names = [nm for nm, t in zip(NAMES, ins) if t is not None]
    for nm, a, r in zip(names, g1, g2):
        assert a.dtype == r.dtype, nm
        scale = r.float().abs().max().clamp(min=1.0)
        err = (a.float() - r.float()).abs().max() / scale
        assert err < atol_g, f"d{nm}: relative error {err:.2e}"


def test_all_inputs_fp32_multi_chunk_ragged_sizes():
    # l spans two chunks, the last one partial; d is not a multiple of the channel blocks
    _check(_inputs(2, 40, 20, 4))


def test_released_state_size():
    _check(_inputs(1, 36, 8, 16, seed=9))


def test_optional_inputs_absent():
    _check(_inputs(1, 40, 16, 4, with_D=False, with_z=False, with_h0=False))


def test_state_size_not_a_power_of_two():
    _check(_inputs(1, 9, 8, 5))


def test_gradient_through_final_state_only_and_output_only():
    ins = _inputs(1, 40, 16, 4, seed=3)
    _check(ins, use_y=False)
    _check(ins, use_h=False)


def test_bf16_inputs_against_reference_on_the_same_inputs():
    ins = _inputs(1, 40, 20, 4, dtype=torch.bfloat16, seed=4)
    _check(ins, atol_y=3e-2, rtol=2e-2, atol_g=3e-2)


def test_strided_views_as_the_mixer_passes_them():
    b, l, d, n = 1, 33, 16, 4
    g = torch.Generator().manual_seed(5)
    xz = torch.randn(b, l, 2 * d, generator=g).to(DEVICE).requires_grad_()
    dbc = torch.randn(b, l, 3 + 2 * n, generator=g).to(DEVICE).requires_grad_()
    x, z = xz.split([d, d], dim=-1)
    _, B, C = dbc.split([3, n, n], dim=-1)
    delta = F.softplus(torch.randn(b, l, d, generator=g)).to(DEVICE)
    A = -torch.rand(d, n, generator=g).to(DEVICE) - 0.1
    D = torch.randn(d, generator=g).to(DEVICE)
    y1, h1 = _triton(x, delta, A, B, C, D, z, None)
    y2, h2 = selective_scan_reference(x, delta, A, B, C, D, z, None)
    torch.testing.assert_close(y1, y2, atol=1e-4, rtol=1e-4)
    g1 = torch.autograd.grad(y1.sum() + h1.sum(), [xz, dbc])
    g2 = torch.autograd.grad(y2.sum() + h2.sum(), [xz, dbc])
    for a, r in zip(g1, g2):
        torch.testing.assert_close(a, r, atol=1e-3, rtol=1e-4)


def test_no_grad_forward_matches():
    ins = [t.detach() if t is not None else None for t in _inputs(2, 20, 16, 4, seed=6)]
    with torch.no_grad():
        y1, h1 = _triton(*ins)
    y2, h2 = selective_scan_reference(*ins)
    torch.testing.assert_close(y1, y2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h1, h2, atol=1e-4, rtol=1e-4)


@requires_cuda
def test_auto_dispatch_uses_triton_on_cuda():
    assert "triton" in available_backends("scan", "cuda")
    ins = [t.detach() for t in _inputs(2, 64, 32, 16, seed=7)]
    y1, h1 = selective_scan(*ins, backend="triton")
    y2, h2 = selective_scan(*ins, backend="reference")
    torch.testing.assert_close(y1, y2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h1, h2, atol=1e-4, rtol=1e-4)


@requires_cuda
def test_long_sequence_bf16_on_gpu():
    ins = _inputs(2, 1000, 64, 16, dtype=torch.bfloat16, seed=8)
    _check(ins, atol_y=5e-2, rtol=3e-2, atol_g=5e-2)
