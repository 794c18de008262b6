"""The fused CPU kernels (backend ``cpu``) against the reference: outputs, final states, every gradient."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from blackmamba.ops import registry as backend
from blackmamba.ops import selective_scan, selective_scan_step
from blackmamba.ops.cpu import build as cpu
from blackmamba.ops.cpu.decode import exp_approx
from blackmamba.ops.conv import causal_conv1d_step
from blackmamba.ops.scan import selective_scan_reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the cpu backend is unavailable")

NAMES = ("x", "delta", "A", "B", "C", "D", "z", "initial_state")


def inputs(b, l, d, n, seed=0, dtype=torch.float32, D=True, z=True, init=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = r(b, l, d)
    delta = F.softplus(r(b, l, d) - 1)
    A = -torch.exp(0.5 * r(d, n))
    out = [x.to(dtype), delta.to(dtype), A.float(), r(b, l, n).float(), r(b, l, n).float(),
           r(d).float() if D else None, r(b, l, d).to(dtype) if z else None, r(b, d, n).float() if init else None]
    if dtype == torch.float64:
        out = [t.double() if t is not None else None for t in out]
    return out


def scan_and_grads(fn, args, seed=1):
    """(y, final state, gradients of a random linear function of both w.r.t. every given input)."""
    args = [t.detach().clone().requires_grad_() if t is not None else None for t in args]
    y, s = fn(*args)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)
    given_ = [t for t in args if t is not None]
    grads = torch.autograd.grad((y.double() * gy.double()).sum() + (s.double() * gs.double()).sum(), given_)
    return y, s, grads


def cpu_scan(*args):
    return selective_scan(*args, backend="cpu")


def ref_scan(*args):
    return selective_scan(*args, backend="reference")


def assert_grads_close(got, want, rtol, atol):
    for name, a, b in zip([n for n in NAMES], got, want):
        scale = b.abs().max().item() + 1e-12
        err = (a.double() - b.double()).abs().max().item()
        assert err <= atol + rtol * scale, f"grad {name}: max error {err:.3g} (scale {scale:.3g})"


# ------------------------------------------------------------------------- exp
def test_fast_exp_matches_torch_exp():
    # ~2 ulp of polynomial and rounding error, plus the float32 rounding of the argument x log2(e),
    # which grows with |x| exactly as the rounding of delta*A does in a float32 reference
    x = torch.linspace(-87, 88, 400_001)
    got, want = exp_approx(x).double(), torch.exp(x.double())
    rel = ((got - want) / want).abs()
    assert (rel <= 2.5e-7 + 1.5e-7 * x.double().abs()).all(), rel.max()
    near = x.abs() <= 1
    assert rel[near].max() < 2.5e-7
    tiny = exp_approx(torch.tensor([-150.0, -104.0, 0.0]))
    assert tiny[0] == 0 and 0 <= tiny[1] < 1e-44 and tiny[2] == 1


# ------------------------------------------------------------------------- forward and backward
@pytest.mark.parametrize("n", [16, 5])
@pytest.mark.parametrize("d", [64, 37])
def test_forward_and_gradients_match_reference(n, d):
    args = inputs(2, 75, d, n)  # 75 steps: three checkpoint chunks, the last one partial
    y, s, g = scan_and_grads(cpu_scan, args)
    y_ref, s_ref, g_ref = scan_and_grads(ref_scan, args)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    assert_grads_close(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("D,z,init", [(False, False, False), (True, False, True), (False, True, False)])
def test_optional_arguments(D, z, init):
    args = inputs(3, 40, 20, 16, D=D, z=z, init=init)
    y, s, g = scan_and_grads(cpu_scan, args)
    y_ref, s_ref, g_ref = scan_and_grads(ref_scan, args)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    assert_grads_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_only_the_final_state_is_used():
    args = inputs(1, 50, 16, 16)
    args = [t.clone().requires_grad_() for t in args]
    _, s = cpu_scan(*args)
    got = torch.autograd.grad(s.sum(), args, allow_unused=True)
    _, s_ref = ref_scan(*args)
    want = torch.autograd.grad(s_ref.sum(), args, allow_unused=True)
    for name, a, b in zip(NAMES, got, want):
        if b is None:
            assert a is None or a.abs().max() == 0, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("x_dtype,delta_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.bfloat16)])
def test_bfloat16_inputs(x_dtype, delta_dtype):
    args = inputs(2, 40, 48, 16)
    args[0] = args[0].to(x_dtype)
    args[1] = args[1].to(delta_dtype)
    args[6] = args[6].to(x_dtype)
    y, s, g = scan_and_grads(cpu_scan, args)
    y_ref, s_ref, g_ref = scan_and_grads(ref_scan, args)
    assert y.dtype == x_dtype and s.dtype == torch.float32
    assert g[0].dtype == x_dtype and g[1].dtype == delta_dtype
    # the scan itself runs in fp32 on the same (rounded) inputs: only the output roundings differ
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    assert_grads_close(g, g_ref, rtol=1e-2, atol=1e-3)


def test_non_contiguous_views_as_in_the_mixer():
    # x, z come out of in_proj(...).split and B, C out of x_proj(...).split: strided views
    b, l, d, n = 2, 33, 24, 16
    xz = torch.randn(b, l, 2 * d)
    x, z = xz.split([d, d], dim=-1)
    dbc = torch.randn(b, l, 3 + 2 * n)
    _, B, C = dbc.split([3, n, n], dim=-1)
    delta = F.softplus(torch.randn(b, l, d))
    A = -torch.rand(d, n) - 0.1
    D = torch.randn(d)
    y, s = cpu_scan(x, delta, A, B, C, D, z)
    y_ref, s_ref = ref_scan(x, delta, A, B, C, D, z)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    # float64 runs the same kernels in double precision, so finite differences are meaningful
    args = inputs(2, 37, 3, 2, dtype=torch.float64)  # 37 steps cross a checkpoint boundary
    args = [t.requires_grad_() for t in args]
    assert torch.autograd.gradcheck(cpu_scan, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_float64_mamba_state_size():
    args = inputs(1, 9, 17, 16, dtype=torch.float64, init=False)
    args = [t.requires_grad_() if t is not None else None for t in args]
    assert torch.autograd.gradcheck(cpu_scan, args, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), l=st.integers(1, 80), d=st.integers(1, 40), n=st.sampled_from([1, 3, 16, 20]),
       data=st.data())
def test_random_shapes_and_split_points(b, l, d, n, data):
    args = inputs(b, l, d, n, seed=b * 1000 + l * 10 + d)
    y, s, g = scan_and_grads(cpu_scan, args)
    y_ref, s_ref, g_ref = scan_and_grads(ref_scan, args)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    assert_grads_close(g, g_ref, rtol=1e-5, atol=1e-5)
    # chunked: the state carried across split points gives the one-pass result
    x, delta, A, B, C, D, z, s0 = args
    cuts = sorted(set(data.draw(st.lists(st.integers(0, l), max_size=3))))
    ys, state = [], s0
    for lo, hi in zip([0] + cuts, cuts + [l]):
        yc, state = cpu_scan(x[:, lo:hi], delta[:, lo:hi], A, B[:, lo:hi], C[:, lo:hi], D, z[:, lo:hi], state)
        ys.append(yc)
    torch.testing.assert_close(torch.cat(ys, 1), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, s, rtol=1e-5, atol=1e-5)


def test_padding_leaves_the_state_untouched():
    x, delta, A, B, C, D, z, s0 = inputs(2, 20, 19, 16)
    _, s = cpu_scan(torch.zeros_like(x), torch.zeros_like(delta), A, B, C, D, z, s0)
    torch.testing.assert_close(s, s0, rtol=0, atol=0)


def test_more_states_than_the_kernels_hold_runs_the_reference():
    args = inputs(1, 6, 4, cpu.library().bm_scan_max_state() + 1)
    y, s = cpu_scan(*args)
    y_ref, s_ref = selective_scan_reference(*args)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, s_ref)


# ------------------------------------------------------------------------- decode steps
@pytest.mark.parametrize("n", [16, 7, 20])
def test_scan_step_matches_reference(n):
    x, delta, A, B, C, D, z, s0 = inputs(3, 5, 33, n)
    state, state_ref = s0.clone(), s0.clone()
    for t in range(5):
        y = selective_scan_step(x[:, t], delta[:, t], A, B[:, t], C[:, t], D, z[:, t], state, backend="cpu")
        y_ref = selective_scan_step(x[:, t], delta[:, t], A, B[:, t], C[:, t], D, z[:, t], state_ref,
                                    backend="reference")
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("K", [4, 2, 1])
def test_conv_step_matches_reference(dtype, K):
    g = torch.Generator().manual_seed(K)
    x = torch.randn(2, 6, 40, generator=g).to(dtype)
    w = torch.randn(40, K, generator=g).to(dtype)
    bias = torch.randn(40, generator=g).to(dtype)
    state = torch.randn(2, 40, K - 1, generator=g).to(dtype)
    state_ref = state.clone()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    for t in range(6):
        y = causal_conv1d_step(x[:, t], w, bias, state, backend="cpu")
        y_ref = causal_conv1d_step(x[:, t], w, bias, state_ref, backend="reference")
        torch.testing.assert_close(y, y_ref, **tol)
        torch.testing.assert_close(state, state_ref, rtol=0, atol=0)


# ------------------------------------------------------------------------- dispatch and fallback
def test_auto_picks_cpu_and_the_choice_can_be_forced():
    assert backend.resolve("scan", torch.device("cpu"))[0] == "cpu"
    backend.set_backend("reference")
    try:
        assert backend.resolve("scan_step", torch.device("cpu"))[0] == "reference"
        assert backend.resolve("scan", torch.device("cpu"), backend="cpu")[0] == "cpu"
    finally:
        backend.set_backend(None)
    assert backend.resolve("conv_step", torch.device("cpu"))[0] == "cpu"


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("BLACKMAMBA_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_tried", False)
    monkeypatch.setattr(backend, "_resolved", {})  # choices made while the library was there
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu.available()
        assert not cpu.available()
        name, _ = backend.resolve("scan", torch.device("cpu"))
    assert name == "reference"
    msgs = [str(w.message) for w in caught if "fused CPU kernels" in str(w.message)]
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    args = inputs(1, 5, 3, 2)
    y, _ = selective_scan(*args)  # auto: the reference, no error
    torch.testing.assert_close(y, selective_scan_reference(*args)[0])
