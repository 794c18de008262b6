"""The CPU kernel for op ``linear`` on a quantized weight (csrc/qgemv.cpp) against ``F.linear`` on the dequantized
weight and x quantized as the product defines (``quantize_activation``): shapes (odd widths, partial groups,
several tasks and threads), group sizes, float32 and bfloat16 rows, bias; every row bit-identical whatever the
batch; which calls reach the kernel; NaN; and the AVX2 build (and the AVX-512 code compiling) besides the
native one."""

import platform
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from blackmamba.ops import linear, registry
from blackmamba.ops.cpu import build as cpu
from blackmamba.ops.cpu import decode
from blackmamba.ops.quant import QuantizedWeight, quantize_activation, quantize_weight

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the cpu backend is unavailable")


def case(o, i, rows, mode, group, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, generator=g) * torch.exp(torch.randn(o, 1, generator=g))
    x = torch.randn(rows, i, generator=g)
    b = torch.randn(o, generator=g) if bias else None
    return quantize_weight(w, mode, group), x, b


def product_input(x, qw):
    """What the product multiplies W by (ops/quant.py): x quantized, for int4 to int8 per weight group, for int8
    to int16 per 128 inputs."""
    return quantize_activation(x, qw.group_size) if qw.mode == "int4" else quantize_activation(x, 128, 32767)


def check_close(y, x, qw, bias, rel=1e-5):
    """|y - F.linear in float64| <= rel * (|x'| |W|^T + |bias|), elementwise (float32 sums), x' = product_input."""
    x = product_input(x.float(), qw)
    w = qw.dequantize(torch.float64)
    ref = F.linear(x.double(), w, None if bias is None else bias.double())
    mag = F.linear(x.double().abs(), w.abs(), None if bias is None else bias.double().abs())
    bad = (y.double() - ref).abs() > rel * mag + 1e-30
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} beyond {rel} relative; worst " \
                          f"{((y.double() - ref).abs() / mag.clamp_min(1e-30)).max().item():.2e}"


@settings(max_examples=60, deadline=None)
@given(o=st.integers(1, 90), i=st.integers(1, 300), rows=st.integers(1, cpu.MAX_ROWS),
       mode=st.sampled_from(["int8", "int4"]), group=st.sampled_from([32, 64, 2, 6, 34]), bf16=st.booleans(),
       bias=st.booleans(), seed=st.integers(0, 2**16))
# widths the integer ways take (int8: a multiple of 16, one group of 128, several and a partial one; int4: a
# multiple of 64, groups of 32 and 64), at a batch of 1 and of several rows
@example(o=40, i=128, rows=1, mode="int8", group=32, bf16=False, bias=True, seed=1)
@example(o=37, i=784, rows=3, mode="int8", group=32, bf16=False, bias=False, seed=2)
@example(o=9, i=48, rows=8, mode="int8", group=32, bf16=True, bias=True, seed=3)
@example(o=40, i=256, rows=1, mode="int4", group=64, bf16=False, bias=True, seed=4)
# int4 rows of 768 bytes or more (dot.h kLongRowBytes: taken one at a time), each ending in a partial chunk of
# groups (54 groups of 32: 6 chunks of 8 and one of 6; 26 of 64: 3 and one of 2)
@example(o=9, i=1728, rows=1, mode="int4", group=32, bf16=False, bias=False, seed=5)
@example(o=7, i=1664, rows=3, mode="int4", group=64, bf16=False, bias=True, seed=6)
def test_kernel_matches_f_linear_on_the_dequantized_weight(o, i, rows, mode, group, bf16, bias, seed):
    qw, x, b = case(o, i, rows, mode, group, seed, bias)
    if bf16:
        x = x.to(torch.bfloat16)
    with torch.no_grad():
        y = decode.linear_cpu(x, qw, b)
    assert y.dtype == x.dtype and y.shape == (rows, o)
    if bf16:  # float32 sums of the bfloat16 rows, rounded to bfloat16 at the end
        ref = F.linear(product_input(x.float(), qw), qw.dequantize(), b)
        torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=1e-5 * ref.abs().max().item() + 1e-6)
        check_close(y.float(), x.float(), qw, b, rel=2**-8)
    else:
        check_close(y, x, qw, b)
        xq = product_input(x, qw)
        torch.testing.assert_close(y, F.linear(xq, qw.dequantize(), b), rtol=1e-5,
                                   atol=1e-5 * F.linear(xq.abs(), qw.dequantize().abs()).max().item())


@pytest.mark.parametrize("i,group", [(64, 32), (77, 64), (33, 6), (4096, 32)])
def test_any_stored_bytes(i, group):
    """Every byte value (int4: nibble 0, value -8, too, which quantize_weight does not write; int8: -128), odd
    widths' unused nibbles not 8, negative and zero scales: the kernel computes what dequantize says (4096 inputs
    of -128 · ±32767 stay within the integer sums)."""
    g = torch.Generator().manual_seed(i)
    o, rows = 50, 3
    x = torch.randn(rows, i, generator=g)
    q4 = torch.randint(0, 256, (o, (i + 1) // 2), dtype=torch.uint8, generator=g)
    s4 = (torch.randn(o, -(-i // group), generator=g) * (torch.rand(o, 1, generator=g) > 0.1)).half()
    q8 = torch.randint(-128, 128, (o, i), dtype=torch.int8, generator=g)
    s8 = torch.randn(o, generator=g)
    for qw in (QuantizedWeight("int4", q4, s4, i, group), QuantizedWeight("int8", q8, s8, i)):
        with torch.no_grad():
            check_close(decode.linear_cpu(x, qw), x, qw, None)


@settings(max_examples=30, deadline=None)
@given(o=st.integers(1, 90), i=st.integers(1, 200), mode=st.sampled_from(["int8", "int4"]),
       group=st.sampled_from([32, 64, 6]), bias=st.booleans(), seed=st.integers(0, 2**16))
@example(o=21, i=160, mode="int8", group=32, bias=True, seed=1)  # the integer ways (x rows four at a time: int8)
@example(o=21, i=192, mode="int4", group=64, bias=False, seed=2)
@example(o=11, i=1536, mode="int4", group=32, bias=False, seed=3)  # rows of 768 bytes: one at a time
# int4 (the integer way): rows 20-22 one at a time at a batch of 1, rows 20-21 a block of 2 at 3 or more
@example(o=23, i=192, mode="int4", group=32, bias=True, seed=4)
def test_rows_are_batch_invariant(o, i, mode, group, bias, seed):
    """Each row of a few-row product is bit-identical to that row alone and to it within any other batch."""
    qw, x, b = case(o, i, cpu.MAX_ROWS, mode, group, seed, bias)
    with torch.no_grad():
        full = decode.linear_cpu(x, qw, b)
        for r in range(cpu.MAX_ROWS):
            assert torch.equal(full[r:r + 1], decode.linear_cpu(x[r:r + 1], qw, b))
        assert torch.equal(full[2:5], decode.linear_cpu(x[2:5], qw, b))


@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 6)])
def test_large_shapes_over_several_tasks_and_threads(mode, group):
    """More rows than one task (64) and than the threads, a tail of rows that fills no block, widths past a
    cache line and a vector of groups: what the prefetch and the row blocks must get right."""
    for o, i, rows in ((1000, 768, 1), (333, 1030, 3), (517, 2047, 8)):
        qw, x, b = case(o, i, rows, mode, group or 32, o)
        with torch.no_grad():
            y = decode.linear_cpu(x, qw, b)
        check_close(y, x, qw, b)
        assert torch.equal(y[-1:], decode.linear_cpu(x[-1:], qw, b))


class Counting:
    """Stands for the library: counts bm_qgemv calls, hands everything to the real one."""

    def __init__(self, lib):
        self.lib, self.calls = lib, 0

    def __getattr__(self, name):
        return getattr(self.lib, name)

    def bm_qgemv(self, *args):
        self.calls += 1
        return self.lib.bm_qgemv(*args)


@pytest.fixture
def counting(monkeypatch):
    lib = Counting(cpu.library())
    monkeypatch.setattr(decode, "library", lambda: lib)
    return lib


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_op_linear_takes_the_kernel_on_cpu_and_the_reference_otherwise(mode, counting):
    registry.set_backend("auto")
    try:
        assert registry.resolve("linear", torch.zeros(1))[0] == "cpu"
        qw, x, b = case(40, 70, 3, mode, 32, 0)
        with torch.no_grad():
            y = linear(x, qw, b)  # auto: the cpu backend, its kernel
            assert counting.calls == 1 and torch.equal(y, decode.linear_cpu(x, qw, b))
            y3 = linear(x.view(3, 1, 70), qw, b)  # leading dimensions: 3 rows
            assert counting.calls == 3 and y3.shape == (3, 1, 40) and torch.equal(y3.view(3, 40), y)
            ref = linear(x, qw, b, backend="reference")
            assert counting.calls == 3 and torch.equal(ref, F.linear(product_input(x, qw), qw.dequantize(), b))
            many = torch.randn(cpu.MAX_ROWS + 1, 70)  # more rows than the kernel takes: the reference
            assert torch.equal(linear(many, qw, b), F.linear(product_input(many, qw), qw.dequantize(), b))
            assert counting.calls == 3
        # a gradient to compute: the reference, differentiable in x (int4's rounding of x passes it through)
        xg = x.clone().requires_grad_()
        y = linear(xg, qw, b)
        assert counting.calls == 3 and y.grad_fn is not None
        y.sum().backward()
        torch.testing.assert_close(xg.grad, qw.dequantize().sum(0).expand(3, 70))
        with torch.no_grad():  # ... but not under no_grad
            linear(xg, qw, b)
        assert counting.calls == 4
        # a float64 row: the reference
        assert linear(x.double(), qw, b.double()).dtype == torch.float64 and counting.calls == 4
        with pytest.raises(RuntimeError):  # a wrong bias: F.linear's error, not a kernel reading past it
            linear(x, qw, torch.randn(39))
        with pytest.raises(RuntimeError):  # a wrong width
            linear(torch.randn(2, 71), qw)
    finally:
        registry.set_backend(None)


def test_bf16_rows_give_bf16_and_match_the_reference_closely():
    qw, x, b = case(64, 96, 2, "int4", 32, 5)
    xb, b = x.to(torch.bfloat16), b.to(torch.bfloat16)
    with torch.no_grad():
        y = linear(xb, qw, b, backend="cpu")
        ref = linear(xb, qw, b, backend="reference")  # bfloat16 weights and math: coarser than the kernel
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=3e-2, atol=3e-2 * ref.abs().max().item())


def test_unsupported_inputs_are_refused_by_the_kernel():
    lib = cpu.library()
    qw, x, _ = case(8, 16, 1, "int4", 32, 0)
    y = torch.empty(1, 8)
    args = (x.data_ptr(), qw.q.data_ptr(), qw.scales.data_ptr(), None, y.data_ptr())
    assert lib.bm_qgemv(1, *args, cpu.MAX_ROWS + 1, 16, 8, 32, 1) == 1
    assert lib.bm_qgemv(7, *args, 1, 16, 8, 32, 1) == 2
    assert lib.bm_qgemv(1, *args, 1, 16, 8, 33, 1) == 3
    assert lib.bm_qgemv(0, *args, 1, 16, 8, 32, 1) == 3  # int8 has no groups
    assert lib.bm_qgemv(1, *args, 1, 16, 8, 32, 1) == 0


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 targets")
@pytest.mark.parametrize("arch", ["x86-64-v4", "x86-64"])
def test_the_avx512_and_the_generic_code_compile(arch, tmp_path):
    """This machine may not run AVX-512 (or lack AVX): the code for it compiles, at least (x86-64: the generic
    vector code and the float16 conversion by the bits)."""
    compiler = cpu._compiler()
    if not shutil.which(compiler):
        pytest.skip("no compiler")
    flags = [f for f in cpu.CFLAGS if f != "-shared"]
    proc = subprocess.run([compiler, f"-march={arch}", *flags, "-Wno-psabi", "-c", str(cpu.CSRC / "qgemv.cpp"),
                           "-o", str(tmp_path / "qgemv.o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("mode,group,i", [("int4", 32, 128), ("int4", 6, 30), ("int8", 0, 160), ("int8", 0, 30)])
def test_a_nan_in_x_gives_nan_as_the_reference_does(mode, group, i):
    """The products quantize x per group: a NaN must not vanish into an integer (the integer and the float way)."""
    qw, x, _ = case(20, i, 3, mode, group or 32, 0)
    x[1, 5] = float("nan")
    with torch.no_grad():
        y = decode.linear_cpu(x, qw)
    ref = linear(x, qw, backend="reference")
    assert torch.equal(y.isnan(), ref.isnan()) and y[1].isnan().all() and not y[[0, 2]].isnan().any()
