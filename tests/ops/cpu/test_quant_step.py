"""The fused decode kernels (csrc/mamba_step.cpp, moe_step.cpp) on int8 / int4 projections (ops/quant.py) against
their references, which multiply by each ``QuantizedWeight`` through op ``linear`` (csrc/qgemv.cpp, the same
``dot_rows`` view): shapes, modes, group sizes, batches 1-8, the state updates; every row identical whatever the
batch; and the calls that still take the reference (a gradient, a wrapped projection, mixed formats). Also the
``QuantizedLinear.weight`` cache."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from blackmamba.layers.quantized import QuantizedLinear
from blackmamba.ops.cpu import build as cpu
from blackmamba.ops.cpu import decode
from blackmamba.ops.mamba_step import mamba_step_reference
from blackmamba.ops.moe import moe_step_reference
from blackmamba.ops.quant import quantize_weight

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the cpu backend is unavailable")

GROUPS = [2, 6, 32, 34, 64]


def _no_reference(*args, **kwargs):
    raise AssertionError("the fused kernel fell back to the reference")


def mamba_case(b, H, I_, N, R, K, mode, group, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def q(o, i):
        return quantize_weight(torch.randn(o, i, generator=g) / i ** 0.5, mode, group)

    def t(*shape, s=0.3):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    A = -torch.exp(torch.randn(I_, N, generator=g) * 0.3)  # the mixer's -exp(A_log)
    weights = dict(in_proj=q(2 * I_, H), conv_w=t(I_, K), conv_b=t(I_, s=0.1), x_proj=q(R + 2 * N, I_), dt_w=t(I_, R),
                   dt_b=t(I_, s=0.1), A=A, D=torch.randn(I_, generator=g), out_proj=q(H, I_))
    h = t(b, H, s=1.0)
    conv_state, ssm_state = t(b, I_, K - 1, s=1.0), torch.randn(b, I_, N, generator=g)
    return weights, h, conv_state, ssm_state


def mamba_args(w, h, conv_state, ssm_state):
    return (h, w["in_proj"], w["conv_w"], w["conv_b"], w["x_proj"], w["dt_w"], w["dt_b"], w["A"], w["D"],
            w["out_proj"], conv_state, ssm_state)


def moe_case(b, H, F, E, mode, group, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    fc1 = [quantize_weight(torch.randn(2 * F, H, generator=g) / H ** 0.5, mode, group) for _ in range(E)]
    fc2 = [quantize_weight(torch.randn(H, F, generator=g) / F ** 0.5, mode, group) for _ in range(E)]
    router_w = (torch.randn(E, H, generator=g) / H ** 0.5).to(dtype)
    router_b = (torch.randn(E, generator=g) * 0.1).to(dtype)
    return router_w, router_b, fc1, fc2, torch.randn(b, H, generator=g).to(dtype)


# How close a fused step is to its reference, relative to the largest value. Both quantize each projection's
# input (ops/quant.py product_input) from float32 values they compute in different orders: where one lands on
# the other side of a rounding boundary, that input differs by one step, 1/32767 of its group's largest for int8
# products (seen up to 4.7e-5 of the output over 300 random cases), 1/127 for int4 (rarer, 258 times larger: seen
# 5e-4 with groups of 6). A wrong lane, scale or group errs by a part in sqrt(inputs) of the output or more;
# test_qgemv holds the products themselves to float32 rounding.
REL = {"int8": 2e-4, "int4": 1e-2}


def _close(a, b, rel):
    scale = max(1.0, b.abs().max().item())
    torch.testing.assert_close(a.float(), b.float(), rtol=rel, atol=rel * scale)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, cpu.MAX_ROWS), H=st.integers(1, 70), I_=st.integers(1, 80), N=st.integers(1, 17),
       R=st.integers(1, 5), K=st.integers(2, 4), mode=st.sampled_from(["int8", "int4"]), group=st.sampled_from(GROUPS),
       seed=st.integers(0, 2**16))
# widths that are multiples of 64 (every BlackMamba projection): the fused kernels' int4 projections take the
# integer path (csrc/dot.h int8_x); test_qgemv holds that path to F.linear
@example(b=1, H=128, I_=192, N=16, R=4, K=4, mode="int4", group=32, seed=1)
@example(b=3, H=128, I_=192, N=16, R=4, K=4, mode="int4", group=64, seed=2)
def test_fused_quantized_mamba_step_matches_reference(b, H, I_, N, R, K, mode, group, seed):
    w, h, cs, ss = mamba_case(b, H, I_, N, R, K, mode, group, torch.float32, seed)
    cs_ref, ss_ref = cs.clone(), ss.clone()
    with torch.no_grad():
        for step in range(3):
            x = h * (step + 1)
            ref = mamba_step_reference(*mamba_args(w, x, cs_ref, ss_ref))
            with pytest.MonkeyPatch.context() as m:
                m.setattr(decode, "mamba_step_reference", _no_reference)
                out = decode.mamba_step_cpu(*mamba_args(w, x, cs, ss))
            assert out.dtype == ref.dtype == torch.float32 and out.shape == (b, H)
            _close(out, ref, REL[mode])
    _close(ss, ss_ref, REL[mode])
    torch.testing.assert_close(cs, cs_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32), ("int4", 6)])
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32])
def test_fused_quantized_mamba_step_bf16_model(mode, group, state_dtype):
    """bfloat16 activations and conv / dt weights: the reference rounds every op's result to bfloat16, the kernel
    keeps float32 inside (as for bfloat16 weights, tests/ops/cpu/test_decode.py)."""
    w, h, cs, ss = mamba_case(4, 48, 96, 16, 3, 4, mode, group, torch.bfloat16, 1)
    cs = cs.to(state_dtype)
    cs_ref, ss_ref = cs.clone(), ss.clone()
    with torch.no_grad():
        out = decode.mamba_step_cpu(*mamba_args(w, h, cs, ss))
        ref = mamba_step_reference(*mamba_args(w, h, cs_ref, ss_ref))
    assert out.dtype == torch.bfloat16
    _close(out, ref, 3e-2)
    _close(ss, ss_ref, 3e-2)
    _close(cs, cs_ref, 1e-2)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, cpu.MAX_ROWS), H=st.integers(1, 70), F=st.integers(1, 40), E=st.integers(1, 9),
       mode=st.sampled_from(["int8", "int4"]), group=st.sampled_from(GROUPS), bf16=st.booleans(),
       activation=st.sampled_from(["silu", "gelu"]), same=st.booleans(), seed=st.integers(0, 2**16))
@example(b=2, H=128, F=64, E=4, mode="int4", group=32, bf16=False, activation="silu", same=False, seed=1)  # (int8_x)
@example(b=5, H=192, F=128, E=3, mode="int4", group=64, bf16=False, activation="gelu", same=True, seed=2)
def test_fused_quantized_moe_step_matches_reference(b, H, F, E, mode, group, bf16, activation, same, seed):
    dtype = torch.bfloat16 if bf16 else torch.float32
    rw, rb, fc1, fc2, h = moe_case(b, H, F, E, mode, group, dtype, seed)
    if same:  # every token on one expert: one pass over its weights for all
        h = h[:1].repeat(b, 1)
    with torch.no_grad():
        ref = moe_step_reference(h, rw, rb, fc1, fc2, activation)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(decode, "moe_step_reference", _no_reference)
            out = decode.moe_step_cpu(h, rw, rb, fc1, fc2, activation)
    assert out.dtype == ref.dtype == dtype and out.shape == (b, H)
    _close(out, ref, 2e-2 if bf16 else REL[mode])


@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_steps_are_batch_invariant(mode, group, dtype):
    """Each row of a batch of 8 is bit-identical to that row alone: output and state updates."""
    b = cpu.MAX_ROWS
    w, h, cs, ss = mamba_case(b, 64, 160, 16, 4, 4, mode, group, dtype, 7)
    cs1, ss1 = cs.clone(), ss.clone()
    rw, rb, fc1, fc2, x = moe_case(b, 64, 96, 4, mode, group, dtype, 7)
    with torch.no_grad():
        out = decode.mamba_step_cpu(*mamba_args(w, h, cs, ss))
        moe_out = decode.moe_step_cpu(x, rw, rb, fc1, fc2, "silu")
        for r in range(b):
            one = decode.mamba_step_cpu(*mamba_args(w, h[r:r + 1], cs1[r:r + 1], ss1[r:r + 1]))
            assert torch.equal(one[0], out[r])
            assert torch.equal(decode.moe_step_cpu(x[r:r + 1], rw, rb, fc1, fc2, "silu")[0], moe_out[r])
    assert torch.equal(cs, cs1) and torch.equal(ss, ss1)


class Wrapped(nn.Module):
    """Stands for a LoRA-style wrapper around a quantized layer: a module operand, not a weight."""

    def __init__(self, base: QuantizedLinear):
        super().__init__()
        self.base = base
        self.extra = nn.Linear(base.in_features, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.extra(x)


def test_fallbacks_take_the_reference():
    w, h, cs, ss = mamba_case(2, 24, 40, 8, 2, 4, "int4", 32, torch.float32, 3)
    # a wrapped projection among quantized ones
    base = QuantizedLinear(24, 80, "int4", 32)
    base.weight_q, base.weight_scales = w["in_proj"].q, w["in_proj"].scales
    wrapped = dict(w, in_proj=Wrapped(base))
    with torch.no_grad():
        out = decode.mamba_step_cpu(*mamba_args(wrapped, h, cs.clone(), ss.clone()))
        ref = mamba_step_reference(*mamba_args(wrapped, h, cs.clone(), ss.clone()))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # mixed formats: int8 out_proj with int4 in / x projections
    mixed = dict(w, out_proj=quantize_weight(w["out_proj"].dequantize(), "int8"))
    with torch.no_grad():
        out = decode.mamba_step_cpu(*mamba_args(mixed, h, cs.clone(), ss.clone()))
        ref = mamba_step_reference(*mamba_args(mixed, h, cs.clone(), ss.clone()))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # a gradient to compute: the reference, through autograd (its linear on the dequantized weights)
    x = h.clone().requires_grad_(True)
    out = decode.mamba_step_cpu(*mamba_args(w, x, cs.clone(), ss.clone()))
    assert out.requires_grad
    with torch.no_grad():
        _close(out, mamba_step_reference(*mamba_args(w, h, cs.clone(), ss.clone())), 1e-5)

    rw, rb, fc1, fc2, x = moe_case(3, 24, 16, 3, "int8", 0, torch.float32, 3)
    fc1_mixed = [fc1[0], quantize_weight(fc1[1].dequantize(), "int4", 32), fc1[2]]
    with torch.no_grad():
        torch.testing.assert_close(decode.moe_step_cpu(x, rw, rb, fc1_mixed, fc2, "silu"),
                                   moe_step_reference(x, rw, rb, fc1_mixed, fc2, "silu"), rtol=0, atol=0)
    x = x.clone().requires_grad_(True)
    decode.moe_step_cpu(x, rw, rb, fc1, fc2, "gelu").sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_quantized_linear_weight_is_cached_and_follows_its_buffers():
    layer = QuantizedLinear.from_weight(torch.randn(12, 20), "int4", 4)
    w = layer.weight
    assert layer.weight is w and w.q is layer.weight_q and w.scales is layer.weight_scales
    layer.load_state_dict(layer.state_dict())  # in place: the same tensors
    assert layer.weight is w
    other = QuantizedLinear.from_weight(torch.randn(12, 20), "int4", 4)
    layer.load_state_dict(other.state_dict(), assign=True)
    assert layer.weight is not w and torch.equal(layer.weight.q, other.weight_q)
    assert layer.weight.scales is layer.weight_scales
    x = torch.randn(2, 20)
    torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)
    w = layer.weight
    layer.to("cpu")  # nothing to move: the same tensors, the same cached weight
    assert layer.weight is w
    layer.to_empty(device="cpu")
    assert layer.weight is not w and layer.weight.q is layer.weight_q and layer.weight.scales is layer.weight_scales
