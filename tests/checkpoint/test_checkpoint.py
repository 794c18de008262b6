"""Checkpoints: exact round trips (native, release, sharded), hub ids, and precise errors."""

import json

import pytest
import torch
from support.models import SMALL, random_model, write_release_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

import blackmamba
from blackmamba import BlackMambaConfig, CheckpointError
from blackmamba.checkpoint import save_pretrained


@pytest.fixture
def model():
    return random_model(BlackMambaConfig(**SMALL), seed=2)


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_native_round_trip_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = blackmamba.load_pretrained(tmp_path)
    assert loaded.config == model.config
    assert_same(model, loaded)
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_sharded_native_round_trip(model, tmp_path):
    save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    assert_same(model, blackmamba.load_pretrained(tmp_path))


def test_release_round_trip_is_exact(model, tmp_path):
    blackmamba.save_release(model, tmp_path / "rel")
    rel = json.loads((tmp_path / "rel" / "config.json").read_text())
    assert rel["mamba_moe_layers"] == SMALL["layers"] and rel["vocab_size"] == 97
    loaded = blackmamba.load_pretrained(tmp_path / "rel")
    assert loaded.source_format == "release"
    assert_same(model, loaded)
    blackmamba.save_release(loaded, tmp_path / "rel2")
    a = torch.load(tmp_path / "rel" / "pytorch_model.bin", weights_only=True)["model"]
    b = torch.load(tmp_path / "rel2" / "pytorch_model.bin", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a bf16 release file keeps its dtype through load(dtype="auto") and export
    blackmamba.save_release(model, tmp_path / "bf16", dtype=torch.bfloat16)
    m16 = blackmamba.load_pretrained(tmp_path / "bf16", dtype="auto")
    blackmamba.save_release(m16, tmp_path / "bf16b")
    c = torch.load(tmp_path / "bf16" / "pytorch_model.bin", weights_only=True)["model"]
    d = torch.load(tmp_path / "bf16b" / "pytorch_model.bin", weights_only=True)["model"]
    assert all(torch.equal(c[k], d[k].to(c[k].dtype)) for k in c)
    assert {v.dtype for k, v in d.items() if not k.endswith(("A_log", ".D"))} == {torch.bfloat16}


def test_hub_id_goes_through_huggingface_hub(model, tmp_path, monkeypatch):
    import huggingface_hub

    write_release_checkpoint(tmp_path / "snap", model)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = blackmamba.load_pretrained("Zyphra/BlackMamba-1.5B", revision="main")
    assert calls and calls[0][0] == "Zyphra/BlackMamba-1.5B" and "pytorch_model.bin" in calls[0][2]
    assert_same(model, loaded)


def test_hub_failure_is_one_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"Zyphra/BlackMamba-2.8B: no such local folder .* could not be fetched "
                                              r"from the Hugging Face hub .*network unreachable"):
        blackmamba.load_pretrained("Zyphra/BlackMamba-2.8B")


def test_a_missing_relative_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def hub(*a, **k):
        raise AssertionError("looked up on the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for spec in ("runs/x", "./x", "a/b/c", "~/no-such-run-folder", str(tmp_path / "x")):
        with pytest.raises(CheckpointError, match=r"no such folder \(.* does not exist\)"):
            blackmamba.load_pretrained(spec)


def test_every_bad_tensor_is_listed(model, tmp_path):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["decoder.layers.0.mixer.A_log"]
    del sd["decoder.final_layernorm.bias"]
    sd["decoder.layers.9.mixer.extra.weight"] = torch.zeros(3)
    sd["decoder.layers.2.mixer.in_proj.weight"] = torch.zeros(5, 5)
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blackmamba", **model.config.to_dict()}))
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        blackmamba.load_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing tensor decoder.layers.0.mixer.A_log (expected shape [64, 16])" in msg
    assert "missing tensor decoder.final_layernorm.bias" in msg
    assert "unexpected tensor decoder.layers.9.mixer.extra.weight (shape [3])" in msg
    assert "wrong shape for decoder.layers.2.mixer.in_proj.weight: expected [128, 32], found [5, 5]" in msg


def test_release_missing_tensor_and_unknown_keys(model, tmp_path):
    rel = write_release_checkpoint(tmp_path, model)
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    del sd["model"]["decoder.layers.1.mixer.router.bias"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="missing tensor decoder.layers.1.mixer.router.bias"):
        blackmamba.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**rel, "rotary": True, "n_heads": 2}))
    with pytest.raises(CheckpointError, match="unknown keys: n_heads, rotary"):
        blackmamba.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**rel, "num_layers": 3}))
    with pytest.raises(CheckpointError, match="mamba_moe_layers has 6 entries but num_layers is 3"):
        blackmamba.load_pretrained(tmp_path)


def test_native_unknown_config_keys(model, tmp_path):
    model.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, "n_layer": 4}))
    with pytest.raises(CheckpointError, match="unknown config keys: n_layer"):
        blackmamba.load_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["bin", "safetensors", "json", "no_weights", "no_config", "not_dir", "no_such"])
def test_unreadable_or_absent_files(model, tmp_path, damage):
    if damage == "bin":
        write_release_checkpoint(tmp_path, model)
        (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle at all")
        match = "unreadable weights"
    elif damage == "safetensors":
        model.save_pretrained(tmp_path)
        (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
        match = "unreadable weights"
    elif damage == "json":
        model.save_pretrained(tmp_path)
        (tmp_path / "config.json").write_text("{not json")
        match = "unreadable JSON"
    elif damage == "no_weights":
        model.save_pretrained(tmp_path)
        (tmp_path / "model.safetensors").unlink()
        match = "no weights"
    elif damage == "no_config":
        match = "no config.json"
    elif damage == "not_dir":
        (tmp_path / "f").write_text("x")
        tmp_path = tmp_path / "f"
        match = "not a folder"
    else:
        tmp_path = tmp_path / "nope"
        match = "no such folder"
    with pytest.raises(CheckpointError, match=match):
        blackmamba.load_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors"])
def test_truncated_weights_name_the_file(model, tmp_path, name):
    if name == "pytorch_model.bin":
        write_release_checkpoint(tmp_path, model)
    else:
        model.save_pretrained(tmp_path)
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        blackmamba.load_pretrained(tmp_path)
    assert str(e.value).startswith(f"{path}: unreadable weights"), str(e.value)


def test_pickled_code_is_never_executed(tmp_path, model):
    write_release_checkpoint(tmp_path, model)

    class Evil:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('%s').write_text('pwned')" % (tmp_path / "pwned"),))

    torch.save({"model": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="unreadable weights"):
        blackmamba.load_pretrained(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_interrupted_save_leaves_previous_checkpoint_intact(model, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    other = random_model(BlackMambaConfig(**SMALL), seed=9)
    with pytest.raises(KeyboardInterrupt):
        other.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
    assert_same(model, blackmamba.load_pretrained(tmp_path))


def test_overrides_and_bad_overrides(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert blackmamba.load_pretrained(tmp_path, mlp_activation="gelu").config.mlp_activation == "gelu"
    with pytest.raises(CheckpointError, match="mlp_activation"):
        blackmamba.load_pretrained(tmp_path, mlp_activation="tanh")
    with pytest.raises(CheckpointError, match="unknown config keys: colour"):
        blackmamba.load_pretrained(tmp_path, colour=1)


@settings(max_examples=8, deadline=None)
@given(pattern=st.lists(st.sampled_from(["r", "1", "2", "5", "11"]), min_size=1, max_size=4),
       hidden=st.sampled_from([8, 16, 24]), vocab=st.integers(3, 70), state=st.integers(1, 6),
       conv=st.integers(1, 5), expand=st.integers(1, 3), seed=st.integers(0, 99))
def test_round_trips_for_random_architectures(tmp_path_factory, pattern, hidden, vocab, state, conv, expand, seed):
    cfg = BlackMambaConfig(layers=pattern, hidden_size=hidden, vocab_size=vocab, state_size=state, conv_width=conv,
                           expand=expand, ffn_hidden_size=8)
    m = random_model(cfg, seed=seed)
    d = tmp_path_factory.mktemp("rt")
    m.save_pretrained(d / "native")
    blackmamba.save_release(m, d / "release")
    for sub in ("native", "release"):
        loaded = blackmamba.load_pretrained(d / sub)
        assert_same(m, loaded)
    ids = torch.randint(0, vocab, (1, 5))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, blackmamba.load_pretrained(d / "release")(ids).logits)
