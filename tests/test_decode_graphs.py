"""Sync-free decode step (eager and fused Triton) and the CUDA-graph runner used by generation."""

import pytest
import torch

from triton_cpu import DEVICE, requires_cuda, requires_triton  # noqa: I001  (must precede the kernels)

import blackmamba
from blackmamba.cuda_graphs import GraphedDecode, decode_stepper, graphs_enabled
from blackmamba.decode import StepPlan, decode_step


def _model(layers=("r", "4", "r", "1"), seed=0, **kw):
    torch.manual_seed(seed)
    cfg = blackmamba.preset("tiny", layers=list(layers), **kw)
    return blackmamba.BlackMambaLM(cfg).to(DEVICE).eval()


def _prefilled(model, ids, copies):
    states = []
    for _ in range(copies):
        s = model.new_state(ids.shape[0])
        model(ids, state=s)
        states.append(s)
    return states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])  # batch 1: as interactive generation runs
def test_unfused_step_equals_the_model_call_exactly(batch, dtype):
    model = _model(layers=("r", "4", "r", "1", "a")).to(dtype)
    ids = torch.randint(0, 256, (batch, 5), device=DEVICE)
    s1, s2, s3 = _prefilled(model, ids, 3)
    plan = StepPlan(model, s3, fused=False)  # on CPU: the kernels bound to buffers
    if DEVICE == "cpu" and dtype == torch.bfloat16 and batch == 1:  # the MoE layer's gemvs bound too
        assert any("_bind_moe" in call.__qualname__ for call in plan.bound)
    for tok in torch.randint(0, 256, (3, batch), device=DEVICE):
        with torch.no_grad():  # as in generation; with autograd on, the CPU decode-step kernels defer to the reference
            ref = model(tok[:, None], state=s1).logits[:, -1]
        out = decode_step(model, tok, s2, fused=False)
        assert torch.equal(out, ref)
        assert torch.equal(plan(tok), ref)
    assert torch.equal(s3.layers[0].ssm, s1.layers[0].ssm)


@requires_triton
def test_fused_step_matches_the_model_call():
    model = _model()
    ids = torch.randint(0, 256, (3, 6), device=DEVICE)
    s1, s2 = _prefilled(model, ids, 2)
    for tok in torch.randint(0, 256, (2, 3), device=DEVICE):
        ref = model(tok[:, None], state=s1).logits[:, -1]
        out = decode_step(model, tok, s2, fused=True)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(s1.layers, s2.layers):
        if a is not None:
            torch.testing.assert_close(a.conv, b.conv, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.ssm, b.ssm, atol=1e-5, rtol=1e-5)


@requires_triton
def test_fused_step_many_tokens_takes_the_grouped_moe_path(monkeypatch):
    import blackmamba.decode as decode

    monkeypatch.setattr(decode, "GEMV_MAX_TOKENS", 1)
    model = _model(layers=("r", "4"))
    ids = torch.randint(0, 256, (3, 4), device=DEVICE)
    s1, s2 = _prefilled(model, ids, 2)
    tok = torch.randint(0, 256, (3,), device=DEVICE)
    ref = model(tok[:, None], state=s1).logits[:, -1]
    torch.testing.assert_close(decode_step(model, tok, s2, fused=True), ref, atol=1e-4, rtol=1e-4)


def test_decode_step_refuses_training_mode():
    model = _model().train()
    with pytest.raises(RuntimeError, match="eval"):
        decode_step(model, torch.zeros(1, dtype=torch.long, device=DEVICE), model.new_state(1))


def test_stepper_off_cuda_is_the_eager_model_call():
    model = _model()
    assert graphs_enabled(model) == (DEVICE == "cuda")
    if DEVICE == "cuda":
        pytest.skip("on CUDA the stepper is the graph (tested below)")
    ids = torch.randint(0, 256, (2, 4))
    state, step = decode_stepper(model, 2)
    with torch.no_grad():  # as generation runs it (with a gradient, the ops take their reference paths)
        model(ids, state=state)
        ref_state = _prefilled(model, ids, 1)[0]
        tok = torch.tensor([5, 7])
        assert torch.equal(step(tok), model(tok[:, None], state=ref_state).logits[:, -1])
    assert state.seqlen == 5


def test_graphed_decode_needs_cuda():
    if DEVICE == "cuda":
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="CUDA"):
        GraphedDecode(_model(), 1)


@requires_cuda
@requires_triton
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_replay_equals_eager_fused_step_and_greedy_generation(batch, monkeypatch):
    model = _model()
    ids = torch.randint(0, 256, (batch, 7), device=DEVICE)
    runner = GraphedDecode(model, batch)
    state = runner.reset()
    model(ids, state=state)
    (eager_state,) = _prefilled(model, ids, 1)
    for tok in torch.randint(0, 256, (4, batch), device=DEVICE):
        out = runner(tok).clone()
        ref = decode_step(model, tok, eager_state, fused=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # the same kernels, replayed
    graphed = model.generate(ids, max_new_tokens=12)
    monkeypatch.setenv("BLACKMAMBA_CUDA_GRAPHS", "0")
    eager = model.generate(ids, max_new_tokens=12)
    assert torch.equal(graphed, eager)


@requires_cuda
@requires_triton
def test_graph_is_recaptured_when_a_weight_is_replaced():
    from blackmamba.cuda_graphs import graphed_decode

    model = _model()
    r1 = graphed_decode(model, 1)
    assert graphed_decode(model, 1) is r1
    with torch.no_grad():
        model.decoder.final_layernorm.weight = torch.nn.Parameter(model.decoder.final_layernorm.weight * 2)
    assert graphed_decode(model, 1) is not r1


@requires_cuda
def test_graphs_disabled_for_attention_models():
    assert not graphs_enabled(_model(layers=("r", "a")))


def test_failed_capture_falls_back_to_eager_once(monkeypatch, caplog):
    import blackmamba.cuda_graphs as cg

    calls = []

    def failing(model, batch_size):
        calls.append(batch_size)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cg, "GraphedDecode", failing)
    monkeypatch.setattr(cg, "graphs_enabled", lambda model: True)
    model = _model()
    with caplog.at_level("WARNING", logger="blackmamba"):
        state, step = cg.decode_stepper(model, 2)
        cg.decode_stepper(model, 2)
    assert calls == [2] and "capture failed" in caplog.text
    ids = torch.randint(0, 256, (2, 3), device=DEVICE)
    with torch.no_grad():  # as generation runs it
        model(ids, state=state)
        (ref_state,) = _prefilled(model, ids, 1)
        tok = torch.tensor([1, 2], device=DEVICE)
        assert torch.equal(step(tok), model(tok[:, None], state=ref_state).logits[:, -1])
