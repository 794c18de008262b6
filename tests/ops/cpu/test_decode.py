"""CPU decode kernels against the reference ops: the fused Mamba step, the fused MoE step and the bfloat16-weight
gemv; a projection that is not a plain weight (a LoRA wrapper) goes to the reference, not skipped."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from blackmamba import BlackMambaConfig, BlackMambaLM
from blackmamba.layers import MambaMixer, MoE
from blackmamba.ops import (add_rmsnorm, bind_add_rmsnorm, bind_mamba_step, bind_moe_step, linear, mamba_step,
                            moe_step)
from blackmamba.ops.cpu import build as cpu
from blackmamba.ops.linear import operand_with_bias

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the cpu backend is unavailable")


def mixer(hidden, state=16, dtype=torch.float32, seed=0, conv_width=4):
    torch.manual_seed(seed)
    m = MambaMixer(hidden, state, conv_width).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m = m.to(dtype)
    m.A_log.data, m.D.data = m.A_log.data.float(), m.D.data.float()  # as load_pretrained keeps them
    return m


def step_args(m, h, s):
    return (h, m.in_proj.weight, m.conv1d.weight[:, 0], m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight,
            m.dt_proj.bias, -torch.exp(m.A_log.float()), m.D, m.out_proj.weight, s.conv, s.ssm)


@pytest.mark.parametrize("dtype,b,hidden,state,h_dtype,state_dtype,width", [
    (torch.float32, 1, 48, 16, None, None, 4), (torch.float32, 3, 40, 5, None, None, 4),
    (torch.bfloat16, 2, 48, 16, None, None, 4), (torch.bfloat16, 1, 48, 16, torch.float32, None, 4),
    (torch.bfloat16, 8, 48, 16, None, torch.float32, 4),  # a float32 conv state with bfloat16 weights
    (torch.float32, 2, 40, 16, None, None, 3), (torch.float32, 1, 48, 16, None, None, 6)])  # conv widths besides 4
def test_fused_mamba_step_matches_reference(dtype, b, hidden, state, h_dtype, state_dtype, width):
    h_dtype = h_dtype or dtype  # the activations' dtype may differ from the weights'
    m = mixer(hidden, state, dtype, conv_width=width)
    s_cpu, s_ref = m.new_state(b, state_dtype or dtype, "cpu"), m.new_state(b, state_dtype or dtype, "cpu")
    tol = dict(rtol=1e-5, atol=1e-5) if torch.bfloat16 not in (dtype, h_dtype) else dict(rtol=3e-2, atol=3e-2)
    with torch.no_grad():
        for _ in range(6):
            h = torch.randn(b, hidden).to(h_dtype)
            out = mamba_step(*step_args(m, h, s_cpu), backend="cpu")
            ref = mamba_step(*step_args(m, h, s_ref), backend="reference")
            assert out.dtype == ref.dtype == h_dtype
            torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(s_cpu.ssm, s_ref.ssm, **tol)
    torch.testing.assert_close(s_cpu.conv.float(), s_ref.conv.float(), **tol)


class Wrapped(nn.Module):
    """Stands for a LoRA-style wrapper: not an nn.Linear, adds its own term."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.extra = nn.Linear(base.in_features, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.extra(x)


def test_mixer_step_calls_wrapped_projections():
    m = mixer(32)
    state_plain = m.new_state(1, torch.float32, "cpu")
    h = torch.randn(1, 32)
    with torch.no_grad():
        plain = m.step(h, state_plain)
        m.in_proj = Wrapped(m.in_proj)
        nn.init.zeros_(m.in_proj.extra.weight)
        same = m.step(h, m.new_state(1, torch.float32, "cpu"))
        nn.init.normal_(m.in_proj.extra.weight)
        changed = m.step(h, m.new_state(1, torch.float32, "cpu"))
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-6)
    assert (changed - plain).abs().max() > 1e-3  # the wrapper's term is not skipped


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_bf16_linear_matches_float_math(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(70, 45, generator=g).to(torch.bfloat16)
    bias = torch.randn(70, generator=g)
    x = torch.randn(rows, 45, generator=g)
    y = linear(x, w, bias, backend="cpu")
    torch.testing.assert_close(y, F.linear(x, w.float(), bias), rtol=1e-5, atol=1e-5)
    xb = x.to(torch.bfloat16)
    assert linear(xb, w, backend="cpu").dtype == torch.bfloat16


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, cpu.MAX_ROWS), i=st.integers(1, 70), o=st.integers(1, 90), bf16=st.booleans(),
       seed=st.integers(0, 2**16))
def test_linear_rows_are_batch_invariant(rows, i, o, bf16, seed):
    """Each row of a few-row linear is bit-identical to that row alone (fp32 and bf16 weights), and close to
    F.linear in float math."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, generator=g).to(torch.bfloat16 if bf16 else torch.float32)
    x, bias = torch.randn(rows, i, generator=g), torch.randn(o, generator=g)
    y = linear(x, w, bias, backend="cpu")
    for r in range(rows):
        assert torch.equal(y[r:r + 1], linear(x[r:r + 1], w, bias, backend="cpu"))
    torch.testing.assert_close(y, F.linear(x, w.float(), bias), rtol=1e-5, atol=1e-5)


def moe(hidden, ffn, experts, dtype=torch.float32, activation="silu", seed=0, scale=0.3):
    torch.manual_seed(seed)
    m = MoE(hidden, ffn, experts, activation).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))
    return m.to(dtype)


def moe_args(m, h):
    return (h, *operand_with_bias(m.router), *m.experts(), m.activation)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 8), hidden=st.integers(1, 70), ffn=st.integers(1, 40), experts=st.integers(2, 9),
       activation=st.sampled_from(["silu", "gelu"]), bf16=st.booleans(), seed=st.integers(0, 2**16),
       same=st.booleans())
def test_fused_moe_step_matches_reference(b, hidden, ffn, experts, activation, bf16, seed, same):
    dtype = torch.bfloat16 if bf16 else torch.float32
    m = moe(hidden, ffn, experts, dtype, activation, seed)
    h = torch.randn(b, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if same:  # every token on one expert: they share one pass over its weights
        h = h[:1].repeat(b, 1)
    with torch.no_grad():
        out = moe_step(*moe_args(m, h), backend="cpu")
        ref = moe_step(*moe_args(m, h), backend="reference")
    assert out.dtype == ref.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if not bf16 else dict(rtol=2e-2, atol=2e-2 * max(1.0, ref.abs().max().item()))
    torch.testing.assert_close(out.float(), ref.float(), **tol)


def test_moe_step_routes_saturated_ties_like_torch():
    """Large router logits saturate the sigmoid to 1.0: torch's max then takes the first of the tied experts,
    not the one with the largest logit, and the kernel must do the same."""
    m = moe(16, 8, 4)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.bias.copy_(torch.tensor([5.0, 30.0, 40.0, 20.0]))  # sigmoid: < 1, then three exact 1.0s
        h = torch.randn(2, 16)
        out = moe_step(*moe_args(m, h), backend="cpu")
        want = m.local_experts[1](h)  # expert 1: the first of the saturated three, gate 1.0
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["linear_fc1", "linear_fc2"])
def test_moe_step_calls_wrapped_experts(which):
    m = moe(16, 8, 4)
    h = torch.randn(3, 16)
    with torch.no_grad():
        plain = moe_step(*moe_args(m, h), backend="cpu")
        for e in m.local_experts:
            setattr(e, which, Wrapped(getattr(e, which)))
            nn.init.normal_(getattr(e, which).extra.weight)
        changed = moe_step(*moe_args(m, h), backend="cpu")
        ref = moe_step(*moe_args(m, h), backend="reference")
    assert (changed - plain).abs().max() > 1e-3
    torch.testing.assert_close(changed, ref)


def test_linear_beyond_decode_sizes_is_f_linear():
    w, x = torch.randn(7, 5).to(torch.bfloat16), torch.randn(20, 5).to(torch.bfloat16)
    assert torch.equal(linear(x, w, backend="cpu"), F.linear(x, w))


def test_bf16_weights_decode_close_to_float32():
    torch.manual_seed(0)
    model = BlackMambaLM(BlackMambaConfig(layers=["r", "r"], hidden_size=64, vocab_size=128)).eval()
    half = BlackMambaLM(model.config).eval()
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    half.decoder.layers[0].mixer.A_log.data = model.decoder.layers[0].mixer.A_log.data.clone()
    ids = torch.randint(0, 128, (1, 12))
    s32, s16 = model.new_state(1), half.new_state(1)
    with torch.no_grad():
        for t in range(12):
            a = model(ids[:, t:t + 1], state=s32).logits.float()
            b = half(ids[:, t:t + 1], state=s16).logits.float()
            assert (a - b).abs().max() < 0.05 * a.std() + 0.02


@settings(max_examples=10, deadline=None)
@given(bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_bound_steps_equal_the_ops_call_after_call(bf16, seed):
    """An op bound once (the cpu backend's ``bind``: weights checked, addresses taken) and called token after
    token gives, bit for bit, what the op gives called with all its arguments every time; more rows than its
    kernel takes, or a gradient to compute, go to the reference."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    g = torch.Generator().manual_seed(seed)
    m, e = mixer(32, 8, dtype, seed), moe(32, 24, 4, dtype, seed=seed)
    weights = step_args(m, None, m.new_state(1, dtype, "cpu"))[1:-2]
    mamba, experts = bind_mamba_step(*weights, backend="cpu"), bind_moe_step(*moe_args(e, None)[1:], backend="cpu")
    norm_w = (1 + 0.1 * torch.randn(32, generator=g)).to(dtype)
    norm = bind_add_rmsnorm(norm_w, 1e-5, torch.float32, backend="cpu")
    s_bound, s_op = m.new_state(3, dtype, "cpu"), m.new_state(3, dtype, "cpu")
    r_bound = r_op = None
    with torch.no_grad():
        for _ in range(4):
            h = torch.randn(3, 32, generator=g).to(dtype)
            a, b = mamba(h, s_bound.conv, s_bound.ssm), mamba_step(*step_args(m, h, s_op), backend="cpu")
            assert torch.equal(a, b) and torch.equal(s_bound.ssm, s_op.ssm) and torch.equal(s_bound.conv, s_op.conv)
            assert torch.equal(experts(a), moe_step(*moe_args(e, a), backend="cpu"))
            (n1, r_bound), (n2, r_op) = norm(a, r_bound), add_rmsnorm(a, r_op, norm_w, 1e-5, torch.float32, "cpu")
            assert torch.equal(n1, n2) and torch.equal(r_bound, r_op)
        many = torch.randn(cpu.MAX_ROWS + 1, 32, generator=g).to(dtype)  # more rows than a kernel takes
        s_many, s_ref = m.new_state(len(many), dtype, "cpu"), m.new_state(len(many), dtype, "cpu")
        assert torch.equal(mamba(many, s_many.conv, s_many.ssm),
                           mamba_step(*step_args(m, many, s_ref), backend="reference"))
        assert torch.equal(experts(many), moe_step(*moe_args(e, many), backend="reference"))
    h = torch.randn(2, 32, generator=g).to(dtype).requires_grad_()
    out = experts(h)
    out.sum().backward()
    assert h.grad is not None and torch.equal(out.detach(), moe_step(*moe_args(e, h.detach()), backend="reference"))


def test_a_bound_step_refuses_a_state_of_another_shape():
    """The kernel writes the state in place, so a bound call checks its shape every call and hands another shape
    to the reference, whose ops name it (ValueError) rather than write beyond it."""
    m = mixer(32, 8)
    op = bind_mamba_step(*step_args(m, None, m.new_state(1, torch.float32, "cpu"))[1:-2], backend="cpu")
    small = m.new_state(2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="conv_step: .* state"), torch.no_grad():
        op(torch.randn(2, 32), small.conv[:, :, :1].contiguous(), small.ssm)
    with pytest.raises(ValueError, match="scan_step: .* state"), torch.no_grad():
        op(torch.randn(2, 32), small.conv, small.ssm[:, :, :3].contiguous())


def test_bind_refuses_what_the_op_refuses():
    with pytest.raises(ValueError, match="activation"):
        bind_moe_step(torch.zeros(2, 4), None, [torch.zeros(6, 4)] * 2, [torch.zeros(4, 3)] * 2, "relu6")
    with pytest.raises(ValueError, match="one of each per expert"):
        bind_moe_step(torch.zeros(2, 4), None, [torch.zeros(6, 4)] * 2, [torch.zeros(4, 3)], "silu")
    with pytest.raises(ValueError, match="weight must be"):
        bind_add_rmsnorm(torch.zeros(2, 4), 1e-5)


def test_a_binding_keeps_the_memory_it_reads_when_the_weights_are_replaced():
    """``module.to`` replaces the memory under each Parameter and frees the old: a binding keeps the old alive
    (aliases), so it computes what it computed before rather than reading freed memory."""
    m = mixer(32, 8)
    step = m.bind_step()
    norm_w = nn.Parameter(1 + 0.1 * torch.randn(32))
    norm = bind_add_rmsnorm(norm_w, 1e-5, backend="cpu")
    h = torch.randn(2, 32)
    with torch.no_grad():
        before = step(h, m.new_state(2, torch.float32, "cpu")), norm(h, None)[0]
        m.to(torch.float64)
        norm_w.data = norm_w.data.double()
        for _ in range(3):  # fresh allocations that would reuse the freed memory
            torch.randn(4096, 4096).zero_()
        after = step(h, m.new_state(2, torch.float32, "cpu")), norm(h, None)[0]
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_a_binding_asks_about_gradients_at_each_call():
    """A weight that needs a gradient after the binding was made sends the call to the reference (autograd)."""
    e = moe(16, 8, 3)
    for p in e.parameters():
        p.requires_grad_(False)
    step = bind_moe_step(*moe_args(e, None)[1:], backend="cpu")
    h = torch.randn(2, 16)
    with torch.no_grad():
        assert not step(h).requires_grad
    e.router.weight.requires_grad_(True)
    out = step(h)
    assert out.requires_grad and out.grad_fn is not None
