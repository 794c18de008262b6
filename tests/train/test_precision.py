"""train.precision: activation checkpointing (the same losses and gradients, less memory, the same parameter
names), bf16 autocast (on a GPU)."""

import copy
import pickle

import pytest
import torch

import blackmamba
from blackmamba.train.precision import autocast, enable_activation_checkpointing

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def _model(seed=0):
    torch.manual_seed(seed)
    return blackmamba.BlackMambaLM(blackmamba.preset("tiny", layers=["r", "4", "r", "1"]))


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
    loss.backward()
    # (the wrapper's own attribute appears in parameter names, not in the state dict's keys)
    return loss.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                           for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    ids = torch.randint(0, 256, (2, 12))
    plain = _model()
    ckpt = _model()
    enable_activation_checkpointing(ckpt)
    enable_activation_checkpointing(ckpt)  # idempotent
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    l1, g1 = _loss_and_grads(plain, ids)
    l2, g2 = _loss_and_grads(ckpt, ids)
    torch.testing.assert_close(l1, l2)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], msg=name)
    # the wrapped blocks survive copying and pickling; inference with a state runs as is
    for clone in (copy.deepcopy(ckpt), pickle.loads(pickle.dumps(ckpt))):
        torch.testing.assert_close(clone(ids).logits, ckpt(ids).logits)
    state = ckpt.new_state(2)
    with torch.no_grad():
        torch.testing.assert_close(ckpt(ids, state=state).logits, plain(ids).logits)


def test_autocast_follows_the_precision_setting():
    with autocast("cpu"):  # auto: fp32 on CPU
        assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_activation_checkpointing_keeps_less_for_the_backward():
    """The activations saved for the backward: the wrapped blocks keep only their inputs."""
    ids = torch.randint(0, 256, (2, 64))

    def saved_bytes(model):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids[:, :-1], targets=ids[:, 1:]).loss
        return sum(total)

    plain, ckpt = _model(), _model()
    enable_activation_checkpointing(ckpt)
    assert saved_bytes(ckpt) < 0.5 * saved_bytes(plain)


@requires_cuda
def test_bf16_autocast_training_step_on_gpu():
    model = _model().cuda()
    enable_activation_checkpointing(model)
    ref = _model().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ids = torch.randint(0, 256, (4, 64), device="cuda")
    with autocast("cuda"):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
    loss.backward()
    opt.step()
    blackmamba.ops.set_backend("reference")
    try:
        ref_loss = ref(ids[:, :-1], targets=ids[:, 1:]).loss
    finally:
        blackmamba.ops.set_backend(None)
    assert abs(loss.item() - ref_loss.item()) < 2e-2
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
