"""The ``triton`` backend of ops ``moe_experts`` and ``moe_step`` against the reference.

- ``dispatch_grouped`` (torch._grouped_mm, which also runs on CPU): values and gradients;
- ``expert_gemv`` and ``route_top1`` (Triton, decode): values, under the interpreter without a GPU.
"""

import pytest
import torch

from support.triton_interpreter import DEVICE, requires_triton  # noqa: I001  (must precede the kernels)

from blackmamba.layers.moe import MoE
from blackmamba.ops.moe import experts_on_sorted, moe_experts_reference, moe_step_reference, sort_by_expert
from blackmamba.ops.triton.grouped_mm import dispatch_grouped, expert_offsets, grouped_mm_supported

needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")


def _moe(activation="silu", H=32, F=24, E=4, seed=0):
    torch.manual_seed(seed)
    return MoE(H, F, E, activation=activation).to(DEVICE)


def dispatch_sorted(x, idx, moe):
    """The reference's expert MLPs without the gate."""
    order, inverse, counts = sort_by_expert(idx, moe.num_experts)
    return experts_on_sorted(x[order], counts, *moe.experts(), moe.activation)[inverse]


def test_expert_offsets():
    idx = torch.tensor([2, 0, 2, 3, 0, 2])
    order, offs = expert_offsets(idx, 5)
    assert idx[order].tolist() == [0, 0, 2, 2, 2, 3]
    assert order.tolist() == [1, 4, 0, 2, 5, 3]  # stable
    assert offs.dtype == torch.int32 and offs.tolist() == [2, 2, 5, 6, 6]


@needs_grouped_mm
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_grouped_dispatch_matches_sorted_values_and_grads(activation):
    moe = _moe(activation)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    moe.to(dtype)
    x = torch.randn(11, 32, device=DEVICE, dtype=dtype, requires_grad=True)
    idx = torch.tensor([3, 0, 3, 3, 1, 0, 3, 1, 0, 3, 3], device=DEVICE)  # expert 2 gets no token
    assert grouped_mm_supported(x)
    params = [x] + list(moe.local_experts.parameters())
    g = torch.randn(11, 32, device=DEVICE, dtype=dtype)
    y1 = dispatch_grouped(x, idx, *moe.experts(), activation)
    d1 = torch.autograd.grad((y1 * g).sum(), params, allow_unused=True)
    y2 = dispatch_sorted(x, idx, moe)
    d2 = torch.autograd.grad((y2 * g).sum(), params, allow_unused=True)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(y1, y2, **tol)
    for a, b in zip(d1, d2):
        if b is None:  # the idle expert: no gradient from the reference, zeros from the grouped GEMM
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, **tol)


@needs_grouped_mm
def test_grouped_dispatch_with_no_tokens():
    moe = _moe()
    out = dispatch_grouped(torch.zeros(0, 32, device=DEVICE), torch.zeros(0, dtype=torch.long, device=DEVICE),
                           *moe.experts(), "silu")
    assert out.shape == (0, 32)


@pytest.fixture
def small_gemv_blocks(monkeypatch):
    """Blocks small enough that tiny experts still span several row blocks and reduction slices."""
    from blackmamba.ops.triton import moe as triton_moe

    monkeypatch.setattr(triton_moe, "BLOCK_ROWS", 4)
    monkeypatch.setattr(triton_moe, "BLOCK_K", 16)


@requires_triton
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_expert_gemv_matches_sorted_dispatch_times_gate(activation, small_gemv_blocks):
    from blackmamba.ops.triton.moe import expert_gemv

    moe = _moe(activation, H=40, F=22)  # ragged: H spans 3 slices of 16, F 6 row blocks of 4
    x = torch.randn(5, 40, device=DEVICE)
    idx = torch.tensor([2, 0, 2, 3, 2], device=DEVICE)
    gate = torch.rand(5, device=DEVICE)
    with torch.no_grad():
        y1 = expert_gemv(x, idx, gate, *moe.experts(), activation)
        y2 = dispatch_sorted(x, idx, moe) * gate[:, None]
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)


@requires_triton
def test_expert_gemv_bf16_and_table_cache(small_gemv_blocks):
    from blackmamba.ops.triton.moe import expert_gemv, expert_tables

    moe = _moe().to(torch.bfloat16)
    x = torch.randn(3, 32, device=DEVICE, dtype=torch.bfloat16)
    idx = torch.tensor([1, 1, 3], device=DEVICE)
    gate = torch.rand(3, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        y1 = expert_gemv(x, idx, gate, *moe.experts(), "silu")
        y2 = dispatch_sorted(x, idx, moe) * gate[:, None]
    torch.testing.assert_close(y1, y2, atol=3e-2, rtol=3e-2)
    t1, _, aligned = expert_tables(*moe.experts())
    assert aligned  # separately allocated weights start on 16-byte boundaries
    assert expert_tables(*moe.experts())[0] is t1  # cached
    with torch.no_grad():  # replacing a weight (new storage) must not reuse the old addresses
        moe.local_experts[1].linear_fc1.weight = torch.nn.Parameter(moe.local_experts[1].linear_fc1.weight * 2)
        y3 = expert_gemv(x, idx, gate, *moe.experts(), "silu")
    assert expert_tables(*moe.experts())[0] is not t1
    assert not torch.allclose(y3[:2].float(), y1[:2].float())
    torch.testing.assert_close(y3[2], y1[2])


@requires_triton
def test_expert_gemv_rejects_mixed_dtypes():
    from blackmamba.ops.triton.moe import expert_gemv

    moe = _moe()
    moe.local_experts[2].to(torch.bfloat16)
    with pytest.raises(ValueError, match="one dtype"):
        expert_gemv(torch.zeros(1, 32, device=DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE),
                    torch.ones(1, device=DEVICE), *moe.experts(), "silu")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_top1_matches_the_layer_routing(dtype):
    from blackmamba.ops.triton.moe import route_top1

    moe = _moe(E=5).to(dtype).eval()  # 5 experts: not a power of two
    x = torch.randn(7, 32, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        gate, idx = route_top1(x, moe.router.weight, moe.router.bias)
        ref_idx, ref_gate, _ = moe.route(x)
    assert idx.dtype == torch.int64 and gate.dtype == dtype
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(gate, ref_gate[:, 0], atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)


@requires_triton
@pytest.mark.parametrize("T", [3, 20])  # the gemv kernels, and (past GEMV_MAX_TOKENS) the grouped GEMMs
def test_the_ops_triton_backend_matches_the_reference(T, small_gemv_blocks):
    from blackmamba.ops import moe_experts, moe_step

    moe = _moe(E=5).eval()
    x = torch.randn(T, 32, device=DEVICE)
    idx = torch.randint(0, 5, (T,), device=DEVICE)
    gate = torch.rand(T, 1, device=DEVICE)
    with torch.no_grad():
        got = moe_experts(x, idx, gate, *moe.experts(), "silu", backend="triton")
        torch.testing.assert_close(got, moe_experts_reference(x, idx, gate, *moe.experts(), "silu"),
                                   atol=1e-5, rtol=1e-5)
        router = (moe.router.weight, moe.router.bias)
        got = moe_step(x, *router, *moe.experts(), "silu", backend="triton")
        torch.testing.assert_close(got, moe_step_reference(x, *router, *moe.experts(), "silu"), atol=1e-5, rtol=1e-5)
