"""The four architectures: derived from one BlackMamba pattern, matched in active parameters per token, trained
with one run configuration; configurations survive the TOML file they are written to."""

import re

import pytest

from blackmamba.compare.archs import NAMES, SCALES, TOLERANCE, architectures, base_config, match
from blackmamba.config import ConfigError, preset
from blackmamba.train.config import build_config


def non_embedding_active(cfg):
    return cfg.param_counts()[1] - cfg.padded_vocab_size * cfg.hidden_size


@pytest.mark.parametrize("scale", list(SCALES))
def test_patterns_and_matched_active_parameters(scale):
    archs = {a.name: a for a in architectures(base_config(scale))}
    assert list(archs) == list(NAMES)
    bm = archs["blackmamba"].model
    n = len(bm.layers) // 2
    E = bm.layers[1]
    assert archs["mamba"].model.layers == ["r", "1"] * n
    assert archs["transformer"].model.layers == ["a", "1"] * n
    assert archs["transformer-moe"].model.layers == ["a", E] * n
    target = non_embedding_active(bm)
    for a in archs.values():
        gap = abs(non_embedding_active(a.model) - target) / target
        assert gap <= TOLERANCE, (a.name, gap)
        assert a.model.hidden_size == bm.hidden_size and a.model.vocab_size == bm.vocab_size
    # dense Mamba differs from BlackMamba in the routing alone: the same MLP width, active parameters minus the
    # routers' (E·H + E per MoE layer)
    H, e = bm.hidden_size, int(E)
    assert non_embedding_active(bm) - non_embedding_active(archs["mamba"].model) == n * (e * H + e)
    # the transformers' wider MLP is what makes up for attention's 4H² against Mamba's mixer
    assert archs["transformer"].model.ffn_hidden_size > bm.ffn_hidden_size
    assert archs["transformer"].model.ffn_hidden_size % 8 == 0
    # everything but the model is the same run
    runs = [a.run.to_dict() for a in archs.values()]
    for r in runs:
        r.pop("model")
    assert all(r == runs[0] for r in runs)


def test_paper_scale_is_the_papers_340m_active():
    archs = architectures(base_config("paper"))
    for a in archs:
        assert 0.33e9 < a.model.param_counts()[1] < 0.36e9, a.name
    bm = archs[0].model
    assert bm.param_counts()[0] == pytest.approx(1.46e9, rel=0.01)  # BlackMamba-1.5B
    assert archs[2].model.hidden_size // archs[2].model.num_heads == 64


def test_user_settings_reach_every_architecture_and_the_match_follows():
    base = base_config("tiny", ["corpus/"], ["model.hidden_size=96", "optim.lr=1e-3"])
    for a in architectures(base):
        assert a.run.optim.lr == 1e-3 and a.run.data.paths == ["corpus/"] and a.model.hidden_size == 96
    a = {x.name: x.model for x in architectures(base)}
    target = non_embedding_active(a["blackmamba"])
    assert abs(non_embedding_active(a["transformer"]) - target) / target <= TOLERANCE


def test_match_picks_the_closest_width():
    base = preset("small")
    got = match(base, ["a", "1"] * 2)
    target = non_embedding_active(base)
    gaps = [abs(non_embedding_active(got.replace(ffn_hidden_size=got.ffn_hidden_size + d)) - target)
            for d in (-8, 0, 8)]
    assert gaps[1] == min(gaps)


@pytest.mark.parametrize("assignment, message", [
    ('model.layers=["r", "a"]', "Mamba ('r') and MoE ('8') layers only"),
    ('model.layers=["r", "r"]', "both present"),
])
def test_patterns_compare_cannot_derive_from_are_refused(assignment, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        architectures(base_config("tiny", None, [assignment]))


def test_unknown_scale_is_refused():
    with pytest.raises(ConfigError, match="choose one of tiny, small, paper"):
        base_config("huge")


def test_run_config_round_trips_through_toml(tmp_path):
    cfg = build_config("tiny", None, ['model.layers=["r", "1"]', 'data.mixture=[{paths=["a b"], weight=2.0, '
                                      'name="x"}]', 'train.sample_prompts=["a\\nb \\"q\\""]', "optim.eps=1e-8"])
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml())
    assert build_config(None, path).to_dict() == cfg.to_dict()
