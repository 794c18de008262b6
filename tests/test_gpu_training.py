"""GPU training pieces: activation checkpointing, fused AdamW, fp32 master weights, bf16 autocast."""

import copy
import pickle

import pytest
import torch

import blackmamba
from blackmamba.gpu_training import (autocast, enable_activation_checkpointing, fused_adamw,
                                     prepare_for_gpu_training)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def _model(seed=0):
    torch.manual_seed(seed)
    return blackmamba.BlackMambaLM(blackmamba.preset("tiny", layers=["r", "4", "r", "1"]))


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


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
    # the modified classes survive copying and pickling; state (inference) bypasses the recompute
    for clone in (copy.deepcopy(ckpt), pickle.loads(pickle.dumps(ckpt))):
        torch.testing.assert_close(clone(ids).logits, ckpt(ids).logits)
    state = ckpt.new_state(2)
    with torch.no_grad():
        torch.testing.assert_close(ckpt(ids, state=state).logits, plain(ids).logits)


def test_fused_adamw_step_matches_the_plain_implementation():
    a, b = _model(), _model()
    ids = torch.randint(0, 256, (2, 10))
    opt_a = fused_adamw(a.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    for model, opt in ((a, opt_a), (b, opt_b)):
        for _ in range(2):
            _loss_and_grads(model, ids)
            opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_master_weights_must_be_fp32():
    model = _model().to(torch.bfloat16)
    with pytest.raises(ValueError, match="fp32 master weights"):
        prepare_for_gpu_training(model, "cpu")


def test_autocast_is_a_no_op_off_cuda():
    with autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")


@requires_cuda
def test_bf16_autocast_training_step_on_gpu():
    model = prepare_for_gpu_training(_model(), "cuda", activation_checkpointing=True)
    ref = _model().cuda()
    opt = fused_adamw(model.parameters(), lr=1e-3)
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
