"""The quantized weight format (ops/quant.py): round-to-nearest error bounds, the int4 byte layout on hand-made
rows, zero rows and groups, partial last groups and odd widths, the errors, and op ``linear``'s reference on a
quantized weight."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from blackmamba.ops import linear
from blackmamba.ops.quant import MODES, QuantizedWeight, quantize_activation, quantize_weight


def random_weight(o, i, seed, spread=True):
    """Rows and groups of very different magnitudes (and some zeros), as trained weights have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, generator=g)
    if spread:
        w = (w * torch.exp((2 * torch.randn(o, 1, generator=g)).clamp(-6, 6))
             * torch.exp(torch.randn(1, i, generator=g).clamp(-2, 2)))
    return w


def group_view(t, group):
    """(o, i) → (o, groups, group), zero-padded."""
    o, i = t.shape
    groups = -(-i // group)
    return F.pad(t, (0, groups * group - i)).view(o, groups, group)


def nibbles(q, i):
    """The stored nibbles (o, i) of int4 bytes, element k from byte k // 2 (low nibble for even k)."""
    return torch.stack((q & 0xF, q >> 4), dim=-1).reshape(q.shape[0], -1)[:, :i]


@settings(max_examples=40, deadline=None)
@given(o=st.integers(1, 20), i=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_int8_values_scales_and_error_bound(o, i, seed):
    w = random_weight(o, i, seed)
    qw = quantize_weight(w, "int8")
    assert qw.q.dtype == torch.int8 and qw.q.shape == (o, i) and qw.scales.dtype == torch.float32
    assert qw.shape == (o, i) and qw.group_size == 0 and qw.nbytes == o * i + 4 * o
    assert torch.equal(qw.scales, w.abs().amax(dim=1) / 127)
    assert qw.q.abs().max() <= 127
    assert qw.q.abs().amax(dim=1).eq(127).all()  # each row's largest value is ±127
    err = (w - qw.dequantize()).abs()  # half a step, and the float32 roundings of w / scale and q * scale
    assert (err <= qw.scales[:, None] / 2 * (1 + 4e-5) + 1e-30).all()


@settings(max_examples=40, deadline=None)
@given(o=st.integers(1, 20), i=st.integers(1, 300), group=st.sampled_from([2, 6, 32, 34, 64]),
       seed=st.integers(0, 2**16))
def test_int4_values_scales_and_error_bound(o, i, group, seed):
    w = random_weight(o, i, seed)
    qw = quantize_weight(w, "int4", group)
    groups = -(-i // group)
    assert qw.q.dtype == torch.uint8 and qw.q.shape == (o, (i + 1) // 2)
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (o, groups)
    assert qw.group_size == group and qw.shape == (o, i) and qw.nbytes == o * ((i + 1) // 2) + 2 * o * groups
    n = nibbles(qw.q, i)
    assert n.min() >= 1 and n.max() <= 15  # values -7..7
    if i % 2:
        assert (qw.q[:, -1] >> 4).eq(8).all()  # the unused high nibble holds 0
    amax = group_view(w, group).abs().amax(dim=2)
    s = qw.scales.float()
    # max/7 rounded to float16, one step up where that fell below max/7
    assert (s * 7 >= amax).all()
    nearest = (amax / 7).half().float()
    assert ((s == nearest) | (s == (nearest.half().view(torch.int16) + 1).view(torch.float16).float())).all()
    err = group_view(w - qw.dequantize(), group).abs()
    assert (err <= s[:, :, None] / 2 * (1 + 1e-5) + 1e-30).all()


def test_int4_packing_by_hand():
    # group 6 of 5 values: scale max|w| / 7 = 1, values +8 → nibbles 1 7 8 9 15, then the high nibble 8 of the
    # odd row's last byte
    qw = quantize_weight(torch.tensor([[-7.0, -1.0, 0.0, 1.0, 7.0]]), "int4", group_size=6)
    assert qw.scales.tolist() == [[1.0]]
    assert qw.q.tolist() == [[0x71, 0x98, 0x8F]]
    # two groups of 2: scales 2/7 → (2/7 in float16), 7/7 = 1
    w = torch.tensor([[2.0, -2.0, 7.0, 3.0]])
    qw = quantize_weight(w, "int4", group_size=2)
    assert qw.scales.float()[0, 1] == 1.0
    assert nibbles(qw.q, 4).tolist() == [[15, 1, 15, 11]]
    assert qw.q.tolist() == [[0x1F, 0xBF]]
    # a hand-made weight: bytes → values - 8, times the group's scale
    hand = QuantizedWeight("int4", torch.tensor([[0x80, 0x0F], [0x88, 0xF1]], dtype=torch.uint8),
                           torch.tensor([[0.5, 2.0], [1.0, 0.25]], dtype=torch.float16), 3, 2)
    assert hand.dequantize().tolist() == [[-4.0, 0.0, 14.0], [0.0, 0.0, -1.75]]


def test_int8_by_hand():
    qw = quantize_weight(torch.tensor([[-254.0, 1.0, 127.0, 2.5]]), "int8")
    assert qw.scales.tolist() == [2.0] and qw.q.tolist() == [[-127, 0, 64, 1]]  # 0.5 → 0, 63.5 → 64 (even)
    hand = QuantizedWeight("int8", torch.tensor([[1, -2], [127, -127]], dtype=torch.int8),
                           torch.tensor([0.5, 0.0]), 2)
    assert hand.dequantize().tolist() == [[0.5, -1.0], [0.0, -0.0]]


@pytest.mark.parametrize("mode", MODES)
def test_zero_rows_and_groups_have_scale_zero_and_no_nan(mode):
    w = torch.randn(3, 70)
    w[1] = 0
    w[2, 32:64] = 0  # a whole group
    qw = quantize_weight(w, mode, 32)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert deq[1].eq(0).all() and deq[2, 32:64].eq(0).all()
    if mode == "int8":
        assert qw.scales[1] == 0 and qw.q[1].eq(0).all()
    else:
        assert qw.scales[1].eq(0).all() and qw.scales[2, 1] == 0 and qw.scales[2, 0] > 0
        assert qw.q[1].eq(0x88).all() and qw.q[2, 16:32].eq(0x88).all()


def test_partial_last_group_and_odd_width():
    w = random_weight(4, 75, 0)  # groups 32, 32, 11; 38 bytes a row, the last half used
    qw = quantize_weight(w, "int4", 32)
    assert qw.q.shape == (4, 38) and qw.scales.shape == (4, 3)
    assert (qw.scales[:, 2].float() * 7 >= w[:, 64:].abs().amax(dim=1)).all()
    # the last group is quantized on its own: the same values as that group alone
    alone = quantize_weight(w[:, 64:].contiguous(), "int4", 32)
    assert torch.equal(qw.dequantize()[:, 64:], alone.dequantize())
    assert torch.equal(qw.scales[:, 2:], alone.scales)


def test_tiny_weights_keep_the_bound():
    """max|group| / 7 below float16's normal range (subnormal or 0 when rounded): the scale is raised so that no
    value is clamped."""
    w = torch.tensor([[1e-7, -3e-7, 2e-6, 5e-6, 0.0, 1e-9]])
    qw = quantize_weight(w, "int4", 2)
    s = qw.scales.float()
    assert (s > 0).all()
    err = group_view(w - qw.dequantize(), 2).abs()
    assert (err <= s[:, :, None] / 2 * (1 + 1e-5)).all()


def test_dequantize_dtype_and_bf16_weights():
    w = random_weight(5, 40, 1).to(torch.bfloat16)
    for mode in MODES:
        qw = quantize_weight(w, mode)
        assert torch.equal(qw.dequantize(torch.bfloat16), qw.dequantize().to(torch.bfloat16))
        assert qw.dequantize(torch.float64).dtype == torch.float64


def test_errors_name_what_is_wrong():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="mode 'int2'"):
        quantize_weight(w, "int2")
    for g in (0, 1, 3, 33, 32.0, True):
        with pytest.raises(ValueError, match="group_size"):
            quantize_weight(w, "int4", g)
    quantize_weight(w, "int8", 3)  # int8 ignores the group size
    for bad in (torch.randn(8), torch.randn(2, 3, 4), torch.zeros(0, 4), torch.zeros(4, 0),
                torch.ones(4, 4, dtype=torch.int32)):
        with pytest.raises(ValueError, match="2-D floating-point"):
            quantize_weight(bad, "int8")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight(torch.tensor([[1.0, float("nan")]]), "int4")
    with pytest.raises(ValueError, match="overflow float16"):
        quantize_weight(torch.tensor([[1e6, 1.0]]), "int4", 2)
    qw = quantize_weight(w, "int4", 4)
    with pytest.raises(ValueError, match="q must be torch.uint8 of shape"):
        QuantizedWeight("int4", qw.q[:, :3], qw.scales, 8, 4)
    with pytest.raises(ValueError, match="scales must be torch.float16 of shape"):
        QuantizedWeight("int4", qw.q, qw.scales.float(), 8, 4)
    with pytest.raises(ValueError, match="group_size must be 0"):
        QuantizedWeight("int8", torch.zeros(4, 8, dtype=torch.int8), torch.zeros(4), 8, 32)
    with pytest.raises(ValueError, match="in_features"):
        QuantizedWeight("int8", torch.zeros(4, 8, dtype=torch.int8), torch.zeros(4), 0)
    with pytest.raises(ValueError, match="unknown quantization mode"):
        QuantizedWeight("fp8", qw.q, qw.scales, 8, 4)


@pytest.mark.parametrize("mode", MODES)
def test_linear_reference_is_f_linear_on_the_dequantized_weight(mode):
    w, bias = random_weight(30, 50, 2), torch.randn(30)
    qw = quantize_weight(w, mode)
    x = torch.randn(3, 5, 50)
    y = linear(x, qw, bias, backend="reference")
    # x as the product defines it: int4 quantizes it to int8 per weight group, int8 to int16 per 128 inputs
    act = (lambda v: quantize_activation(v, qw.group_size)) if mode == "int4" else (
        lambda v: quantize_activation(v, 128, 32767))
    assert torch.equal(y, F.linear(act(x), qw.dequantize(), bias))
    xb = x.to(torch.bfloat16)
    yb = linear(xb, qw, backend="reference")
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, F.linear(act(xb), qw.dequantize(torch.bfloat16)))


@settings(max_examples=60, deadline=None)
@given(i=st.integers(1, 200), group=st.sampled_from([2, 6, 32, 34, 64, 128]), rows=st.integers(1, 4),
       levels=st.sampled_from([127, 32767]), zero_group=st.booleans(), seed=st.integers(0, 2**16))
def test_quantize_activation_is_on_a_per_group_grid(i, group, rows, levels, zero_group, seed):
    """Per group of inputs: values on the grid d · {-L..L} with d = max|x| / L (0 for an all-zero group; L 127
    for int4 products, 32767 for int8 ones), each the nearest grid point to x (within d / 2; the group's max
    exactly), a fixed point, and the shape, dtype and gradient (straight through) kept."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, i, generator=g) * torch.exp(3 * torch.randn(rows, 1, generator=g))
    if zero_group:
        x[:, :group] = 0
    xq = quantize_activation(x, group, levels)
    assert xq.shape == x.shape and xq.dtype == x.dtype
    slack = levels * 2.0 ** -22  # float32's rounding of d, of x / d (a tie's other side) and of q · d, in d's:
    for k0 in range(0, i, group):  # each within 2^-24 of |q| d <= L d (a draw went just over 1e-5 d / 2)
        xs, qs = x[:, k0:k0 + group].double(), xq[:, k0:k0 + group].double()
        d = xs.abs().amax(dim=1, keepdim=True) / levels
        n = qs / torch.where(d > 0, d, 1)
        assert (n - n.round()).abs().max() < slack and n.abs().max() <= levels + slack
        assert ((qs - xs).abs() <= d * (0.5 + slack) + 1e-30).all()
        top = xs.abs().argmax(dim=1, keepdim=True)
        torch.testing.assert_close(qs.gather(1, top), xs.gather(1, top), rtol=1e-6, atol=0)
    torch.testing.assert_close(quantize_activation(xq, group, levels), xq, rtol=1e-6, atol=0)  # a fixed point
    xb = x.to(torch.bfloat16)
    assert quantize_activation(xb, group, levels).dtype == torch.bfloat16
    xg = x.clone().requires_grad_()
    quantize_activation(xg, group, levels).mul(torch.arange(i)).sum().backward()
    assert torch.equal(xg.grad, torch.arange(i, dtype=torch.float32).expand(rows, i))
