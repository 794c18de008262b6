"""LoRA with the peft library on the transformers model: the documented target modules train, save, load."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.ecosystem  # also run against the lowest declared transformers / peft / lm-eval

peft = pytest.importorskip("peft")

from support.ecosystem import tiny_model  # noqa: E402

from blackmamba.hf import BlackMambaForCausalLM  # noqa: E402

TARGETS = ["in_proj", "x_proj", "out_proj", "linear_fc1", "linear_fc2", "router"]


def _lora(model):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def test_lora_on_every_documented_target_trains_saves_and_loads(tmp_path):
    base = BlackMambaForCausalLM.from_core(tiny_model(seed=4))
    model = _lora(base)
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 320, (2, 16), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    # the adapters changed the model: the frozen base weights did not move
    assert torch.equal(model.base_model.model.decoder.layers[0].mixer.in_proj.base_layer.weight,
                       tiny_model(seed=4).decoder.layers[0].mixer.in_proj.weight)

    model.eval()
    with torch.no_grad():
        want = model(input_ids=batch).logits
        # generate() through the adapters (the decode step bound once a call) continues as the full forward does
        kw = dict(input_ids=batch[:1, :5], attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=6,
                  do_sample=False, pad_token_id=0)
        lm, binds = base.lm, []
        real = lm.bind_step
        lm.bind_step = lambda: binds.append(1) or real()
        try:
            cached = model.generate(**kw)
        finally:
            del lm.bind_step
        assert binds == [1]  # the adapters' generate took the bound step
        assert cached.tolist() == model.generate(**kw, use_cache=False).tolist()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    fresh = BlackMambaForCausalLM.from_core(tiny_model(seed=4))
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch).logits, want, rtol=0, atol=0)
        # merged adapters give the same model as plain weights
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=batch).logits, want, rtol=1e-5, atol=1e-5)
    assert isinstance(merged, BlackMambaForCausalLM)
