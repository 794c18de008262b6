"""Op ``moe_experts``' ``cpu`` backend (the experts' gated MLPs on the tokens sorted by expert): its two schedules
(one expert per thread in a C kernel, MKL's batched GEMM) against the reference, outputs and every gradient (x,
the gate, each weight); the kernel's activations against float64; MKL's batched GEMM against torch.mm; the MoE
layer's plain and wrapped experts."""

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from blackmamba.layers import MoE
from blackmamba.ops import moe_experts
from blackmamba.ops.activations import ACTIVATIONS
from blackmamba.ops.cpu import build as cpu_ops
from blackmamba.ops.cpu import grouped_mlp as ops_grouped_mlp
from blackmamba.ops.cpu import mkl
from blackmamba.ops.cpu.grouped_mlp import experts_per_thread
from blackmamba.ops.moe import moe_experts_reference

needs_mkl = pytest.mark.skipif(not mkl.available(), reason="this PyTorch build exports no MKL cblas_sgemm_batch")
SCHEDULES = ["per_thread", "batched"]
needs_kernels_and_mkl = pytest.mark.skipif(not (mkl.available() and cpu_ops.available()),
                                           reason="needs PyTorch's MKL and the fused CPU kernels")


@contextlib.contextmanager
def schedule(name):
    """Force the cpu backend's schedule: one expert per thread (any balance), or batched GEMMs (at any size)."""
    if name == "per_thread" and not cpu_ops.available():
        pytest.skip("the fused CPU kernels are unavailable")
    balance = float("inf") if name == "per_thread" else 0.0
    with mock.patch.object(ops_grouped_mlp, "BALANCE", balance), mock.patch.object(ops_grouped_mlp, "MIN_MACS", 0):
        yield


def experts(E, H, Fh, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    fc1 = [(torch.randn(2 * Fh, H, generator=g) / H ** 0.5).to(dtype) for _ in range(E)]
    fc2 = [(torch.randn(H, Fh, generator=g) / Fh ** 0.5).to(dtype) for _ in range(E)]
    return fc1, fc2


def tokens(counts, H, seed):
    """(x (T, H), expert index (T,) in a shuffled order, gate (T, 1)) for ``counts[e]`` tokens of expert e."""
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    idx = idx[torch.randperm(len(idx), generator=g)]
    return torch.randn(sum(counts), H, generator=g), idx, torch.rand(sum(counts), 1, generator=g) + 0.5


def run(counts, H, Fh, activation, backend, seed=0, frozen=(), sched="batched"):
    """(y, dx, dgate, [d fc1_e], [d fc2_e]) of a random linear function of y; weights listed in ``frozen`` need no
    grad."""
    fc1, fc2 = experts(len(counts), H, Fh, seed)
    weights = [w.requires_grad_(i not in frozen) for i, w in enumerate(fc1 + fc2)]
    x, idx, gate = tokens(counts, H, seed)
    x.requires_grad_(), gate.requires_grad_()
    with schedule(sched):
        y = moe_experts(x, idx, gate, weights[:len(counts)], weights[len(counts):], activation, backend=backend)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 2))).sum().backward()
    return y.detach(), x.grad, gate.grad, [w.grad for w in weights]


@needs_mkl
@pytest.mark.parametrize("sched", SCHEDULES)
@settings(max_examples=25, deadline=None)
@given(counts=st.lists(st.integers(0, 9), min_size=1, max_size=5).filter(lambda c: sum(c) > 0),
       H=st.integers(1, 12), Fh=st.integers(1, 20), activation=st.sampled_from(["silu", "gelu"]),
       seed=st.integers(0, 2 ** 16))
def test_cpu_backend_matches_reference(sched, counts, H, Fh, activation, seed):
    ref = run(counts, H, Fh, activation, "reference", seed)
    got = run(counts, H, Fh, activation, "cpu", seed, sched=sched)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    fc1, fc2 = experts(len(counts), H, Fh, seed)
    with torch.no_grad(), schedule(sched):  # inference computes act(a) * b in place: the same numbers
        torch.testing.assert_close(moe_experts(*tokens(counts, H, seed), fc1, fc2, activation, backend="cpu"),
                                   ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)
    for e, (a, b) in enumerate(zip(got[3], ref[3])):
        if counts[e % len(counts)] == 0:  # an expert without rows gets no gradient, as an uncalled module
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_mkl
@pytest.mark.parametrize("sched", SCHEDULES)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_cpu_backend_at_layer_size_matches_reference(sched, activation):
    """Rows of hundreds per expert (MKL's blocked paths, two threads), one expert empty."""
    counts = [300, 0, 170, 230]
    ref = run(counts, 96, 160, activation, "reference")
    got = run(counts, 96, 160, activation, "cpu", sched=sched)
    for a, b in zip((got[0], got[1], got[2], *got[3]), (ref[0], ref[1], ref[2], *ref[3])):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_mkl
@pytest.mark.parametrize("sched", SCHEDULES)
def test_frozen_weights_get_no_gradient(sched):
    counts = [3, 4]
    got = run(counts, 6, 5, "silu", "cpu", frozen=(0, 3), sched=sched)  # expert 0's fc1, expert 1's fc2
    ref = run(counts, 6, 5, "silu", "reference", frozen=(0, 3))
    assert got[3][0] is None and got[3][3] is None
    torch.testing.assert_close(got[3][1], ref[3][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3][2], ref[3][2], rtol=1e-5, atol=1e-5)


@needs_mkl
def test_cpu_backend_batches_from_its_size_threshold_on():
    """Where the experts do not share out over the threads: below MIN_MACS multiply-adds in fc1 the experts run
    one F.linear pair each (bit-identical to the reference), from there the batch."""
    fc1, fc2 = experts(2, 8, 6)
    x, idx, gate = tokens([4, 6], 8, 0)
    macs = 10 * 8 * 12
    unbalanced = mock.patch.object(ops_grouped_mlp, "BALANCE", 0.0)
    with unbalanced, mock.patch.object(ops_grouped_mlp, "MIN_MACS", macs + 1), \
            mock.patch.object(mkl, "gemm_batch") as batch:
        assert torch.equal(moe_experts(x, idx, gate, fc1, fc2, backend="cpu"),
                           moe_experts_reference(x, idx, gate, fc1, fc2, "silu"))
        assert not batch.called
    with unbalanced, mock.patch.object(ops_grouped_mlp, "MIN_MACS", macs), \
            mock.patch.object(mkl, "gemm_batch") as batch:
        moe_experts(x, idx, gate, fc1, fc2, backend="cpu")
        assert batch.called


def test_experts_per_thread_needs_an_even_share_of_rows():
    assert experts_per_thread([512] * 8, 2)
    assert experts_per_thread([610, 560, 526, 520, 500, 480, 470, 430], 2)  # greedy: 2,040 and 2,056 rows
    assert not experts_per_thread([1000, 5, 3, 2], 2)  # one thread would do almost everything
    assert not experts_per_thread([512] * 8, 16)  # 8 threads idle
    assert experts_per_thread([1000, 5, 3, 2], 1)
    assert experts_per_thread([7, 7, 7], 3) and not experts_per_thread([8, 7, 6], 3)  # 8 > 1.05 * 7


@needs_mkl
@pytest.mark.skipif(not cpu_ops.available(), reason="the fused CPU kernels are unavailable")
def test_cpu_backend_picks_its_schedule_from_the_counts():
    """Rows that share out over 2 threads: the per-thread kernel, at any size (no batched GEMM); rows that
    do not: the batched GEMMs from MIN_MACS on."""
    fc1, fc2 = experts(2, 8, 6)
    with mock.patch.object(torch, "get_num_threads", return_value=2), mock.patch.object(mkl, "gemm_batch") as batch:
        got = moe_experts(*tokens([5, 5], 8, 0), fc1, fc2, backend="cpu")
        assert not batch.called
        torch.testing.assert_close(got, moe_experts_reference(*tokens([5, 5], 8, 0), fc1, fc2, "silu"),
                                   rtol=1e-5, atol=1e-5)
        with mock.patch.object(ops_grouped_mlp, "MIN_MACS", 0):
            moe_experts(*tokens([9, 1], 8, 0), fc1, fc2, backend="cpu")
        assert batch.called


@needs_kernels_and_mkl
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_kernel_activation_against_float64(activation):
    """y = act(x) * x and its derivative over [-30, 30] (one expert, a = b = x; y.sum() hands the backward a
    stride-0 gradient): within 1e-6 relative of float64, plus 1e-6 absolute for the tails (gelu: erfc by
    Abramowitz & Stegun 7.1.26)."""
    x = torch.linspace(-30, 30, 6001).unsqueeze(1)
    fc1, fc2 = [torch.ones(2, 1)], [torch.ones(1, 1)]
    xr = x.clone().requires_grad_()
    with schedule("per_thread"):
        y = moe_experts(xr, torch.zeros(x.shape[0], dtype=torch.long), torch.ones(x.shape[0], 1), fc1, fc2, activation,
                        backend="cpu")
    (dx,) = torch.autograd.grad(y.sum(), xr)
    x64 = x.double().requires_grad_()
    y64 = ACTIVATIONS[activation](x64) * x64
    (dx64,) = torch.autograd.grad(y64.sum(), x64)
    torch.testing.assert_close(y.double(), y64.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-5)


@needs_mkl
def test_cpu_backend_falls_back_to_reference_for_bfloat16():
    fc1, fc2 = experts(3, 8, 6, dtype=torch.bfloat16)
    x, idx, gate = tokens([2, 0, 5], 8, 0)
    x = x.to(torch.bfloat16)
    got = moe_experts(x, idx, gate, fc1, fc2, backend="cpu")
    assert torch.equal(got, moe_experts_reference(x, idx, gate, fc1, fc2, "silu"))


def test_bad_arguments_are_named():
    fc1, fc2 = experts(2, 4, 3)
    x, idx, gate = tokens([2, 3], 4, 0)
    with pytest.raises(ValueError, match="2 fc1 and 1 fc2"):
        moe_experts(x, idx, gate, fc1, fc2[:1])
    with pytest.raises(ValueError, match="unknown activation"):
        moe_experts(x, idx, gate, fc1, fc2, "relu")
    with pytest.raises(ValueError, match=r"\(tokens, hidden\)"):
        moe_experts(x[None], idx, gate, fc1, fc2)


@needs_mkl
@settings(max_examples=30, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7), st.integers(0, 7),
                                  st.booleans(), st.booleans()), min_size=1, max_size=4),
       seed=st.integers(0, 2 ** 16))
def test_gemm_batch_matches_torch_mm(shapes, seed):
    """Any shapes (zero sizes included), both transpositions, row-strided operands (column slices of a wider
    buffer), c never read."""
    g = torch.Generator().manual_seed(seed)
    groups, expect = [], []
    for m, n, k, ta, tb in shapes:
        rows, cols = (k, m) if ta else (m, k)
        a = torch.randn(rows, cols + 2, generator=g)[:, 1:1 + cols]  # row stride > width
        b = torch.randn(*((n, k) if tb else (k, n)), generator=g)
        c = torch.full((m, n), float("nan"))
        groups.append((mkl.TRANS if ta else mkl.NO_TRANS, mkl.TRANS if tb else mkl.NO_TRANS, a, b, c, k))
        expect.append((a.T if ta else a) @ (b.T if tb else b))
    mkl.gemm_batch(groups)
    for (*_, c, _k), e in zip(groups, expect):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


@needs_mkl
def test_gemm_batch_rejects_bad_operands():
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="does not give c"):
        mkl.gemm_batch([(mkl.NO_TRANS, mkl.TRANS, a, b, torch.empty(3, 4), 4)])
    with pytest.raises(ValueError, match="float32"):
        mkl.gemm_batch([(mkl.NO_TRANS, mkl.TRANS, a.double(), b.double(), torch.empty(3, 5, dtype=torch.float64), 4)])
    with pytest.raises(ValueError, match="2-D"):
        mkl.gemm_batch([(mkl.NO_TRANS, mkl.TRANS, torch.randn(4), b, torch.empty(3, 5), 4)])
    with pytest.raises(ValueError, match="unit column stride"):
        mkl.gemm_batch([(mkl.NO_TRANS, mkl.NO_TRANS, a, torch.randn(5, 4).T, torch.empty(3, 5), 4)])


class Delegating(nn.Module):
    """Stands for a LoRA wrapper of an expert's linear layer: not an nn.Linear, so it is called as itself."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_moe_layer_wrapped_expert_linears_run_as_modules():
    """Training-mode MoE: plain experts (the cpu kernels) and experts whose linears are wrapped (the reference,
    calling the wrappers) give the same output and gradients."""
    torch.manual_seed(3)
    moe = MoE(12, 20, 4).train()
    x = torch.randn(40, 1, 12)

    def grads(m):
        m.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        y = m(xg)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        return [y.detach(), xg.grad] + [p.grad for p in m.parameters()]

    with mock.patch.object(ops_grouped_mlp, "MIN_MACS", 0):  # either schedule at this size
        via_kernels = grads(moe)
    calls = []
    for e in moe.local_experts:
        e.linear_fc1 = Delegating(e.linear_fc1)
        e.linear_fc1.register_forward_hook(lambda *a: calls.append(1))
    via_modules = grads(moe)
    assert len(calls) == sum(int(n > 0) for n in moe.last_stats["tokens_per_expert"])  # each used expert, once
    for a, b in zip(via_kernels, via_modules):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_reference_equals_per_token_experts():
    torch.manual_seed(4)
    moe = MoE(8, 12, 3)
    x = torch.randn(30, 8)
    idx = torch.randint(0, 2, (30,))  # expert 2 unused
    gate = torch.rand(30, 1)
    with torch.no_grad():
        got = moe_experts_reference(x, idx, gate, *moe.experts(), "silu")
        expect = torch.cat([gate[t] * moe.local_experts[int(i)](x[t:t + 1]) for t, i in enumerate(idx)])
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
