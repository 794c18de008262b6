"""Parity with the released inference code's math (tests/release_reference.py) on release-format files."""

import pytest
import torch
from support.models import random_model, write_release_checkpoint
from support.release_reference import ReleaseReference

import blackmamba
from blackmamba import BlackMambaConfig

CFG = dict(layers=["r", "8", "r", "8", "r", "1", "r", "8"], hidden_size=48, vocab_size=128, ffn_hidden_size=64)


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("release")
    model = random_model(BlackMambaConfig(**CFG), seed=5)
    rel = write_release_checkpoint(path, model)
    sd = torch.load(path / "pytorch_model.bin", weights_only=True)["model"]
    return path, rel, sd


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_full_logits_match_release_code(release_dir, activation):
    path, rel, sd = release_dir
    ours = blackmamba.load_pretrained(path, **({"mlp_activation": "gelu"} if activation == "gelu" else {}))
    assert ours.config.mlp_activation == activation
    ref = ReleaseReference(rel, sd, activation)
    ids = torch.randint(0, 128, (3, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(ids).logits
    expect = ref.forward(ids)
    assert got.shape == expect.shape == (3, 23, 128)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-4)
    # the two activations really differ on these weights (the option is not a no-op)
    other = ReleaseReference(rel, sd, "gelu" if activation == "silu" else "silu").forward(ids)
    assert (other - expect).abs().max() > 1e-3


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("prompt_len", [1, 3, 4, 10])
def test_greedy_continuations_and_stateful_decoding_match(release_dir, activation, prompt_len):
    path, rel, sd = release_dir
    ours = blackmamba.load_pretrained(path, mlp_activation=activation)
    ref = ReleaseReference(rel, sd, activation)
    ids = torch.randint(0, 128, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    expect = ref.greedy(ids, 12)
    got = ours.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expect)
    # stateful chunked decoding: logits of each step equal the release's cached steps
    caches = [dict() for _ in rel["mamba_moe_layers"]]
    state = ours.new_state(batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, state=state).logits, ref.forward(ids, caches), rtol=0, atol=1e-4)
        for t in range(prompt_len, expect.shape[1]):
            tok = expect[:, t:t + 1]
            torch.testing.assert_close(ours(tok, state=state).logits, ref.forward(tok, caches, step=True),
                                       rtol=0, atol=1e-4)


def test_bf16_release_file_loads_exactly_upcast(tmp_path):
    model = random_model(BlackMambaConfig(**CFG), seed=6)
    write_release_checkpoint(tmp_path, model, dtype=torch.bfloat16)
    ours = blackmamba.load_pretrained(tmp_path)
    assert ours.dtype == torch.float32
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)["model"]
    for k, v in ours.state_dict().items():
        assert torch.equal(v, sd[k].float()), k
    kept = blackmamba.load_pretrained(tmp_path, dtype="auto")
    assert kept.dtype == torch.bfloat16
    assert kept.decoder.layers[0].mixer.A_log.dtype == torch.float32
