"""The GPU path's wiring end to end without a GPU: with the triton backend asked for (``set_backend("triton")``)
and Triton's interpreter, the whole model — forward, chunked state, step, generate — runs through every Triton
kernel it has (scan, conv and SSM updates, add + RMSNorm, router, expert gemvs) on CPU tensors, held to the
released inference code's math."""


import pytest
import torch
from support.models import random_model, write_release_checkpoint
from support.release_reference import ReleaseReference
from support.triton_interpreter import DEVICE, requires_triton

import blackmamba
from blackmamba import BlackMambaConfig
from blackmamba.ops import registry

pytestmark = requires_triton
CFG = dict(layers=["r", "8", "r", "1"], hidden_size=32, vocab_size=96, ffn_hidden_size=40)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = tmp_path_factory.mktemp("release")
    rel = write_release_checkpoint(path, random_model(BlackMambaConfig(**CFG), seed=3))
    sd = torch.load(path / "pytorch_model.bin", weights_only=True)["model"]
    return path, ReleaseReference(rel, sd, "silu")


@pytest.fixture
def triton_backend(monkeypatch):
    registry.set_backend("triton")
    used = set()
    resolve = registry.resolve

    def recording(op, device, backend=None):
        name, fn = resolve(op, device, backend)
        used.add((op, name))
        return name, fn

    monkeypatch.setattr(registry, "resolve", recording)
    yield used
    registry.set_backend(None)


def test_forward_chunked_state_step_and_generate_match_the_release(release, triton_backend):
    path, ref = release
    model = blackmamba.load_pretrained(path, device=DEVICE)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.cpu(), ref.forward(ids.cpu()), rtol=0, atol=1e-4)
        caches = [dict() for _ in CFG["layers"]]
        state = model.new_state(2)
        torch.testing.assert_close(model(ids[:, :5], state=state).logits.cpu(), ref.forward(ids[:, :5].cpu(), caches),
                                   rtol=0, atol=1e-4)
        for t in range(5, 9):
            got = model.step(ids[:, t], state)
            want = ref.forward(ids[:, t:t + 1].cpu(), caches, step=True)[:, -1]
            torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-4)
    out = model.generate(ids[:, :4], max_new_tokens=6)
    assert out.cpu().tolist() == ref.greedy(ids[:, :4].cpu(), 6).tolist()
    # every Triton kernel the model has ran; the ops without one ran the reference
    assert {op for op, name in triton_backend if name == "triton"} == {
        "scan", "add_rmsnorm", "mamba_step", "moe_step", "moe_experts"}
    assert {op for op, name in triton_backend if name == "reference"} == {"conv", "linear"}
