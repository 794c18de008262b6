"""CPU decode kernels against the reference ops: the fused Mamba step and the bfloat16-weight gemv."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blackmamba import BlackMambaConfig, BlackMambaLM
from blackmamba.layers import MambaMixer
from blackmamba.ops import cpu, linear, mamba_step

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the cpu backend is unavailable")


def mixer(hidden, state=16, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = MambaMixer(hidden, state).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m = m.to(dtype)
    m.A_log.data, m.D.data = m.A_log.data.float(), m.D.data.float()  # as load_pretrained keeps them
    return m


def step_args(m, h, s):
    return (h, m.in_proj.weight, m.conv1d.weight[:, 0], m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight,
            m.dt_proj.bias, m.A_log, m.D, m.out_proj.weight, s.conv, s.ssm)


@pytest.mark.parametrize("dtype,b,hidden,state,h_dtype", [
    (torch.float32, 1, 48, 16, None), (torch.float32, 3, 40, 5, None), (torch.bfloat16, 2, 48, 16, None),
    (torch.bfloat16, 1, 48, 16, torch.float32)])
def test_fused_mamba_step_matches_reference(dtype, b, hidden, state, h_dtype):
    h_dtype = h_dtype or dtype  # the activations' dtype may differ from the weights'
    m = mixer(hidden, state, dtype)
    s_cpu, s_ref = m.new_state(b, dtype, "cpu"), m.new_state(b, dtype, "cpu")
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
