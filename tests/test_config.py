import pytest
import torch

from blackmamba import BlackMambaConfig, BlackMambaLM, ConfigError, preset


def test_multi_digit_expert_counts():
    cfg = BlackMambaConfig(layers=["r", "16", "r", "10", "1", "a"], hidden_size=32, ffn_hidden_size=16)
    assert cfg.layer_kinds() == [("mamba", 0), ("moe", 16), ("mamba", 0), ("moe", 10), ("mlp", 0), ("attention", 0)]
    model = BlackMambaLM(cfg)
    assert len(model.decoder.layers[1].mixer.local_experts) == 16
    assert len(model.decoder.layers[3].mixer.local_experts) == 10


@pytest.mark.parametrize("bad, field", [
    (dict(layers=["r", "x"]), "layers[1]"),
    (dict(layers=["r", "0"]), "layers[1]"),
    (dict(layers="r8"), "layers"),
    (dict(layers=[]), "layers"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(mlp_activation="relu"), "mlp_activation"),
    (dict(router_train_mode="random"), "router_train_mode"),
    (dict(dt_rank=-3), "dt_rank"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_validation_names_the_field(bad, field):
    with pytest.raises(ConfigError) as e:
        BlackMambaConfig(**bad)
    assert field in str(e.value)


def test_allowed_values_are_listed():
    with pytest.raises(ConfigError, match="silu, gelu"):
        BlackMambaConfig(mlp_activation="swish")


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="unknown config keys: colour, n_layers"):
        BlackMambaConfig.from_dict({"colour": 1, "n_layers": 3})


def test_vocab_padding_is_separate_from_vocab():
    cfg = preset("blackmamba-1.5b")
    assert cfg.vocab_size == 50277 and cfg.padded_vocab_size == 50304
    assert BlackMambaConfig(vocab_size=100, pad_vocab_size_multiple=64).padded_vocab_size == 128


@pytest.mark.parametrize("name, total, active", [
    ("blackmamba-1.5b", 1_458_462_072, 343_694_712),
    ("blackmamba-2.8b", 2_783_213_584, 628_770_832),
])
def test_release_parameter_counts(name, total, active):
    cfg = preset(name)
    assert cfg.d_inner == 2 * cfg.hidden_size and cfg.dt_rank_value == -(-cfg.hidden_size // 16)
    with torch.device("meta"):
        model = BlackMambaLM(cfg)
    assert model.num_parameters() == total
    assert model.num_parameters(active=True) == active
    assert cfg.param_counts() == (total, active)


def test_presets_and_unknown_preset():
    assert preset("tiny", hidden_size=48).hidden_size == 48
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
