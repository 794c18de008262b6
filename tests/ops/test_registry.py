"""The op registry: the one place that picks a backend per op and device, and how the choice is overridden."""

import pytest
import torch
from support.triton_interpreter import HAS_TRITON

from blackmamba.ops import available_backends, registry
from blackmamba.ops.cpu import build

CPU = torch.device("cpu")
OPS = ("scan", "scan_step", "conv", "conv_step", "linear", "add_rmsnorm", "mamba_step", "moe_experts", "moe_step")


def test_every_op_has_a_reference_for_every_device():
    for op in OPS:
        for device in ("cpu", "cuda"):
            assert "reference" in registry._registry[op] and device in registry._registry[op]["reference"][2]


@pytest.fixture
def request_from(monkeypatch):
    """Set BLACKMAMBA_BACKEND (None: unset) and have the registry read it, as at start-up; restored after."""
    def use(value):
        if value is None:
            monkeypatch.delenv("BLACKMAMBA_BACKEND", raising=False)
        else:
            monkeypatch.setenv("BLACKMAMBA_BACKEND", value)
        registry.set_backend(None)
    yield use
    monkeypatch.undo()
    registry.set_backend(None)


@pytest.mark.skipif(not build.available(), reason="no C++ compiler: the cpu backend is unavailable")
def test_auto_takes_the_cpu_kernels_on_cpu_and_never_the_interpreted_triton(request_from):
    request_from(None)
    for op in OPS:
        want = "cpu" if "cpu" in available_backends(op, "cpu") else "reference"
        assert registry.resolve(op, CPU)[0] == want, op
        assert registry.resolve(op, torch.zeros(1))[0] == want, op  # a tensor stands for its device
    assert registry.resolve("scan", CPU)[0] == "cpu"


def test_the_request_comes_from_set_backend_then_the_environment(request_from):
    auto = "cpu" if build.available() else "reference"
    request_from("reference")
    assert registry.resolve("scan", CPU)[0] == "reference"
    assert registry.resolve("scan", CPU, backend="auto")[0] == auto
    registry.set_backend("auto")  # overrides the environment
    assert registry.resolve("scan", CPU)[0] == auto
    registry.set_backend("reference")
    assert registry.resolve("mamba_step", CPU)[0] == "reference"
    request_from(None)  # back to the environment, now unset: auto
    assert registry.resolve("mamba_step", CPU)[0] == auto


def test_unknown_backends_are_refused(request_from):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        registry.set_backend("cuda")
    with pytest.raises(ValueError, match="BLACKMAMBA_BACKEND='gpu' is not a backend"):
        request_from("gpu")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_a_requested_backend_runs_where_it_has_a_kernel_and_the_reference_elsewhere(request_from):
    """Under Triton's interpreter (the test suite sets it) the triton backend takes CPU tensors when asked for;
    ops it has no kernel for (the full-sequence conv, linear) run the reference."""
    request_from("triton")
    for op in ("scan", "scan_step", "conv_step", "add_rmsnorm", "mamba_step", "moe_experts", "moe_step"):
        assert registry.resolve(op, CPU)[0] == "triton", op
    for op in ("conv", "linear"):
        assert registry.resolve(op, CPU)[0] == "reference", op


@pytest.mark.skipif(not build.available(), reason="no C++ compiler: the cpu backend is unavailable")
def test_binding_takes_the_chosen_backends_own_bind_where_it_has_one(request_from):
    """The cpu backend prepares its decode ops once (``bind``); a backend without a bind (the reference) is the
    op called with the fixed operands, and computes what the op computes."""
    request_from(None)
    from blackmamba.ops.cpu import decode
    from blackmamba.ops.norm import add_rmsnorm, bind_add_rmsnorm

    assert registry.binder("mamba_step", CPU) == ("cpu", decode.bind_mamba_step_cpu)
    assert registry.binder("moe_step", CPU) == ("cpu", decode.bind_moe_step_cpu)
    assert registry.binder("add_rmsnorm", CPU, "reference") == ("reference", None)
    assert registry.binder("linear", CPU) == ("cpu", None)  # the head's one call a token is not worth one
    w, h = torch.rand(6) + 0.5, torch.randn(2, 6)
    for backend in ("cpu", "reference"):
        out, res = bind_add_rmsnorm(w, 1e-6, backend=backend)(h, None)
        want = add_rmsnorm(h, None, w, 1e-6, torch.float32, backend="reference")
        torch.testing.assert_close(out, want[0], rtol=1e-6, atol=1e-6)
        assert torch.equal(res, h)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_step_ops_name_a_state_of_another_shape(backend):
    """conv_step and scan_step write their state in place: the op checks shapes before any backend runs."""
    from blackmamba.ops import causal_conv1d_step, selective_scan_step

    b, d, n, K = 2, 5, 3, 4
    x, w = torch.randn(b, d), torch.randn(d, K)
    with pytest.raises(ValueError, match=r"conv_step: .*state \(2, 5, 2\)"):
        causal_conv1d_step(x, w, None, torch.zeros(b, d, K - 2), backend=backend)
    A, B = -torch.rand(d, n), torch.randn(b, n)
    with pytest.raises(ValueError, match=r"scan_step: .*state \(2, 5, 4\)"):
        selective_scan_step(x, x.abs(), A, B, B, None, None, torch.zeros(b, d, n + 1), backend=backend)
    with pytest.raises(ValueError, match=r"scan_step: .*B \(2, 4\)"):
        selective_scan_step(x, x.abs(), A, torch.randn(b, n + 1), B, None, None, torch.zeros(b, d, n), backend=backend)
    y = selective_scan_step(x, x.abs(), A, B, B, None, None, torch.zeros(b, d, n), backend=backend)
    assert y.shape == (b, d)
