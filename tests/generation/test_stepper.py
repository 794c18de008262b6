"""The Stepper: ``model.step`` over a state of its own, replayed from a CUDA graph on a GPU (the graph tests need
one), the model's own step elsewhere."""

import pytest
import torch

from support.triton_interpreter import DEVICE, requires_cuda, requires_triton  # noqa: I001  (must precede the kernels)

import blackmamba
from blackmamba.generation.stepper import Stepper, graphs_enabled


def _model(layers=("r", "4", "r", "1"), seed=0, **kw):
    torch.manual_seed(seed)
    cfg = blackmamba.preset("tiny", layers=list(layers), **kw)
    return blackmamba.BlackMambaLM(cfg).to(DEVICE).eval()


def _prefilled(model, ids):
    state = model.new_state(ids.shape[0])
    with torch.no_grad():
        model(ids, state=state)
    return state


def test_off_cuda_a_step_is_the_models_step():
    model = _model(layers=("r", "4", "a", "1"))
    assert not graphs_enabled(model)  # attention layers are never graphed (their keys grow)
    ids = torch.randint(0, 256, (2, 4), device=DEVICE)
    stepper = Stepper.for_model(model, 2)
    assert not stepper.graphed
    with torch.no_grad():
        model(ids, state=stepper.state)
        ref_state = _prefilled(model, ids)
        for tok in torch.randint(0, 256, (3, 2), device=DEVICE):
            assert torch.equal(stepper(tok), model.step(tok, ref_state))
    assert stepper.state.seqlen == ref_state.seqlen == 7
    stepper.reset()  # a new batch of sequences: back to zeros
    assert stepper.state.seqlen == 0 and not any(t.any() for t in stepper.state.tensors())


@requires_cuda
@requires_triton
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_replay_equals_the_eager_step_and_greedy_generation(batch, monkeypatch):
    model = _model()
    ids = torch.randint(0, 256, (batch, 7), device=DEVICE)
    graphed = Stepper(model, batch, graph=True)
    with torch.no_grad():
        model(ids, state=graphed.reset())
        eager_state = _prefilled(model, ids)
        for tok in torch.randint(0, 256, (4, batch), device=DEVICE):
            out = graphed(tok).clone()
            torch.testing.assert_close(out, model.step(tok, eager_state), atol=1e-5, rtol=1e-5)  # the same kernels
    with_graph = model.generate(ids, max_new_tokens=12)
    monkeypatch.setenv("BLACKMAMBA_CUDA_GRAPHS", "0")
    assert torch.equal(with_graph, model.generate(ids, max_new_tokens=12))


@requires_cuda
@requires_triton
def test_graph_is_captured_again_when_a_weight_is_replaced():
    model = _model()
    first = Stepper.for_model(model, 1)
    assert first.graphed and Stepper.for_model(model, 1) is first
    with torch.no_grad():
        model.decoder.final_layernorm.weight = torch.nn.Parameter(model.decoder.final_layernorm.weight * 2)
    assert Stepper.for_model(model, 1) is not first


def test_a_failed_capture_falls_back_to_the_eager_step_once(monkeypatch, caplog):
    import blackmamba.generation.stepper as stepper_module

    calls = []
    real_init = Stepper.__init__

    def init(self, model, batch_size, graph=False, warmup=2):
        if graph:
            calls.append(batch_size)
            raise RuntimeError("operation not permitted when stream is capturing")
        real_init(self, model, batch_size)

    monkeypatch.setattr(Stepper, "__init__", init)
    monkeypatch.setattr(stepper_module, "graphs_enabled", lambda model: True)
    model = _model()
    with caplog.at_level("WARNING", logger="blackmamba"):
        stepper = Stepper.for_model(model, 2)
        assert Stepper.for_model(model, 2) is stepper
    assert calls == [2] and "capture failed" in caplog.text and not stepper.graphed
    ids = torch.randint(0, 256, (2, 3), device=DEVICE)
    with torch.no_grad():
        model(ids, state=stepper.state)
        tok = torch.tensor([1, 2], device=DEVICE)
        assert torch.equal(stepper(tok), model.step(tok, _prefilled(model, ids)))
