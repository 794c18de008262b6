"""FLOPs accounting (``BlackMambaConfig.flops_by_kind`` and the counts built on it): hand counts of each layer kind,
the matmul part against what ``torch.utils.flop_counter.FlopCounterMode`` measures on the reference ops, the
training and decode rules, and the table ``blackmamba info`` prints."""

import pytest
import torch
from support.models import random_model
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from blackmamba import BlackMambaConfig, ConfigError
from blackmamba.cli import main
from blackmamba.ops import registry

# H=8, I=16, N=4, K=4, R=1, F=12, E=4, V=32, 2 heads of 4
SIZES = dict(hidden_size=8, expand=2, state_size=4, conv_width=4, dt_rank=1, ffn_hidden_size=12, vocab_size=32,
             num_heads=2, max_seq_len=16)
NORM = 5 * 8  # a block's residual add + RMSNorm: + , x², sum, × rsqrt, × weight


def config(*layers) -> BlackMambaConfig:
    return BlackMambaConfig(layers=list(layers), **SIZES)


@pytest.fixture(autouse=True)
def reference_ops():
    registry.set_backend("reference")
    yield
    registry.set_backend(None)


def test_hand_counts_of_each_kind():
    mamba = (2 * 8 * 32  # in_proj H → 2I
             + 2 * 16 * 4 + 16  # depthwise conv, width 4, + bias
             + 16  # silu
             + 2 * 16 * (1 + 2 * 4)  # x_proj I → R + 2N
             + 2 * 1 * 16 + 16 + 16  # dt_proj R → I, + bias, softplus
             + 16 * 4 * 7 + 16  # scan: 7 per (channel, state) element, Δ·x per channel
             + 2 * 16  # D skip
             + 2 * 16  # silu(z) gate
             + 2 * 16 * 8  # out_proj I → H
             + NORM)
    moe = (2 * 8 * 4 + 4 + 4  # router H → E, bias, sigmoid
           + 2 * 8 * 24 + 12 + 12 + 2 * 12 * 8  # one expert: fc1 H → 2F, act(a) * b, fc2 F → H
           + 8  # × gate
           + NORM)
    mlp = 2 * 8 * 24 + 12 + 12 + 2 * 12 * 8 + NORM
    attention = (2 * 8 * 24  # qkv
                 + 3 * 2 * 8 + 3 * 2  # rotary of q and k, angles of 2 frequencies (×, cos, sin)
                 + 2 * 8 * 16 + 2 * 8 * 16  # QKᵀ and AV over 16 keys
                 + 5 * 2 * 16  # softmax: 5 per score, 2 heads
                 + 2 * 8 * 8  # out_proj
                 + NORM)
    head = 2 * 8 * 32 + 7 * 8  # tied head H → V, final LayerNorm
    assert config("r").flops_by_kind(16) == {"mamba": mamba, "embedding": 0, "head": head}
    assert config("4").flops_by_kind(16) == {"moe": moe, "embedding": 0, "head": head}
    assert config("1").flops_by_kind(16) == {"mlp": mlp, "embedding": 0, "head": head}
    assert config("a").flops_by_kind(16) == {"attention": attention, "embedding": 0, "head": head}
    both = config("r", "4", "r", "4")
    assert both.flops_by_kind(16) == {"mamba": 2 * mamba, "moe": 2 * moe, "embedding": 0, "head": head}
    assert both.flops_per_token(16) == 2 * mamba + 2 * moe + head
    untied = BlackMambaConfig(layers=["r"], **{**SIZES, "tie_embeddings": False})
    assert untied.flops_by_kind(16)["head"] == head


def measured(fn) -> int:
    """FLOPs FlopCounterMode counts while ``fn`` runs, with CPU attention (which it has no formula for) counted as
    its two products, as it counts the CUDA kernels."""
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind, layer", [("mamba", "r"), ("moe", "4"), ("mlp", "1"), ("attention", "a")])
def test_the_matmuls_are_what_flop_counter_measures_per_layer(kind, layer):
    cfg = config(layer)
    block = random_model(cfg).decoder.layers[0]
    b, L = 3, 16
    h = torch.randn(b, L, 8)
    assert measured(lambda: block(h, None)) == b * L * cfg.flops_by_kind(L, matmul_only=True)[kind]
    if kind == "moe":  # each token ran through one expert, and the tokens went to several
        routed = block.mixer.last_stats["tokens_per_expert"]
        assert int(routed.sum()) == b * L and int((routed > 0).sum()) >= 2


def test_the_matmuls_are_what_flop_counter_measures_for_a_model_window_and_a_decode_step():
    cfg = config("r", "4", "1", "a")
    model = random_model(cfg)
    L = 16
    ids = torch.randint(0, 32, (1, L))
    per_token = cfg.flops_by_kind(L, matmul_only=True)
    assert measured(lambda: model(ids)) == L * sum(per_token.values())
    # a step after L tokens: attention scores L + 1 keys (the conv step is elementwise, not a convolution op)
    state = model.new_state(2)
    with torch.no_grad():
        model(torch.randint(0, 32, (2, L)), state=state)
    step = cfg.flops_by_kind(L + 1, matmul_only=True)
    step["mamba"] -= 2 * 16 * 4
    assert measured(lambda: model.step(torch.randint(0, 32, (2,)), state)) == 2 * sum(step.values())


def test_training_is_three_forwards_and_checkpointing_adds_the_blocks():
    cfg = config("r", "4", "1", "a")
    fwd = cfg.flops_by_kind(16)
    assert cfg.train_flops_per_token(16) == 3 * cfg.flops_per_token(16)
    blocks = fwd["mamba"] + fwd["moe"] + fwd["mlp"] + fwd["attention"]
    assert cfg.train_flops_per_token(16, activation_checkpointing=True) == 3 * cfg.flops_per_token(16) + blocks
    assert cfg.train_flops_per_token(32) > cfg.train_flops_per_token(16)  # attention scores L keys per query
    mamba = config("r", "4")
    assert mamba.train_flops_per_token(16) == mamba.train_flops_per_token(2048)


def test_decode_grows_with_the_context_only_for_attention():
    mixed = config("r", "4", "1", "a")
    per_key = 4 * 8 + 5 * 2  # QKᵀ and AV (2 FLOPs per multiply-add), softmax over 2 heads
    assert mixed.decode_flops_per_token(100) - mixed.decode_flops_per_token(10) == 90 * per_key
    assert mixed.decode_flops_per_token(10) == mixed.flops_per_token(11)  # the new token's key included
    no_attention = config("r", "4", "1")
    assert no_attention.decode_flops_per_token(0) == no_attention.decode_flops_per_token(100_000)
    assert no_attention.decode_flops_per_token(0) == no_attention.flops_per_token()


@pytest.mark.parametrize("call", [lambda c: c.flops_by_kind(-1), lambda c: c.train_flops_per_token(0),
                                  lambda c: c.decode_flops_per_token(1.5), lambda c: c.train_flops_per_token(True)])
def test_bad_token_counts_are_refused(call):
    with pytest.raises(ConfigError):
        call(config("r"))


def test_info_prints_the_table(capsys):
    from blackmamba import preset

    cfg = preset("tiny")
    assert main(["info", "tiny", "--context", "64"]) == 0
    out = capsys.readouterr().out
    assert "on 64-token windows, decode after 64 tokens" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ")}
    fwd, dec = cfg.flops_by_kind(64), cfg.flops_by_kind(65)
    for kind in ("mamba", "moe", "embedding", "head"):
        assert rows[kind][-3:] == [f"{fwd[kind]:,}", f"{3 * fwd[kind]:,}", f"{dec[kind]:,}"]
    assert rows["total"] == ["4", "40,776", f"{cfg.flops_per_token(64):,}", f"{cfg.train_flops_per_token(64):,}",
                             f"{cfg.decode_flops_per_token(64):,}"]
    assert f"{cfg.train_flops_per_token(64, activation_checkpointing=True):,} train FLOPs/token" in out
    assert main(["info", "tiny", "--context", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--context 0: must be a positive integer" in err
