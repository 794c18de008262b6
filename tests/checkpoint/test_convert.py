"""``blackmamba convert``: every path between native, release and transformers folders is bit-exact."""

from __future__ import annotations

import json

import pytest
import torch
from support.env import checkout_env
from support.ecosystem import tiny_model, train_tokenizer
from safetensors.torch import load_file

pytestmark = pytest.mark.ecosystem  # also run against the lowest declared transformers / peft / lm-eval

import blackmamba
from blackmamba.checkpoint import read_config, read_state_dict
from blackmamba.cli import main
from blackmamba.checkpoint.convert import convert, parse_size


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release-format folder with bf16 tensors (as published), plus a tokenizer."""
    root = tmp_path_factory.mktemp("release")
    blackmamba.save_release(tiny_model(seed=9), root, dtype=torch.bfloat16)
    train_tokenizer(root / "tokenizer.json")
    return root


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A native folder with mixed dtypes: bf16 weights, fp32 A_log and D."""
    root = tmp_path_factory.mktemp("native")
    blackmamba.checkpoint.save_pretrained(tiny_model(seed=9), root, dtype=torch.bfloat16)
    return root


@pytest.mark.parametrize("path", [["release", "native", "release"], ["release", "hf", "release"],
                                  ["release", "native", "hf", "native", "release"]])
def test_release_round_trips_are_bit_exact(release, tmp_path, path):
    src = release
    for i, fmt in enumerate(path[1:]):
        dst = tmp_path / f"{i}-{fmt}"
        convert(src, dst, fmt)
        src = dst
    assert json.loads((src / "config.json").read_text()) == json.loads((release / "config.json").read_text())
    assert_same_tensors(torch.load(src / "pytorch_model.bin", weights_only=True)["model"],
                        torch.load(release / "pytorch_model.bin", weights_only=True)["model"])
    assert (src / "tokenizer.json").read_bytes() == (release / "tokenizer.json").read_bytes()


def test_native_and_hf_round_trip_with_mixed_dtypes_and_shards(native, tmp_path):
    convert(native, tmp_path / "hf", "hf", max_shard_bytes=40_000)
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    for name in ("configuration.py", "modeling.py", "cache.py"):
        assert (tmp_path / "hf" / name).is_file()
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["BlackMambaForCausalLM"] and hf_config["model_type"] == "blackmamba"
    convert(tmp_path / "hf", tmp_path / "back", "native")
    assert read_config(tmp_path / "back") == read_config(native)
    assert_same_tensors(load_file(str(tmp_path / "back" / "model.safetensors")),
                        load_file(str(native / "model.safetensors")))
    sd = read_state_dict(tmp_path / "hf")
    assert sd["decoder.layers.0.mixer.A_log"].dtype == torch.float32
    assert sd["decoder.layers.0.mixer.in_proj.weight"].dtype == torch.bfloat16


def test_converted_hf_folder_loads_in_transformers_and_generates_like_the_source(release, tmp_path):
    from transformers import AutoModelForCausalLM

    convert(release, tmp_path / "hf", "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    source = blackmamba.load_pretrained(release)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0).tolist() == \
        source.generate(ids, max_new_tokens=8).tolist()


def test_dtype_is_cast_only_when_asked(release, tmp_path):
    convert(release, tmp_path / "fp32", "native", dtype=torch.float32)
    sd = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    assert {t.dtype for t in sd.values()} == {torch.float32}
    convert(release, tmp_path / "half", "hf", dtype=torch.float16)
    half = read_state_dict(tmp_path / "half")
    assert half["decoder.layers.0.mixer.in_proj.weight"].dtype == torch.float16
    assert half["decoder.layers.0.mixer.A_log"].dtype == half["decoder.layers.2.mixer.D"].dtype == torch.float32
    original = torch.load(release / "pytorch_model.bin", weights_only=True)["model"]
    for k, v in original.items():
        assert torch.equal(sd[k], v.float()), k
    convert(tmp_path / "fp32", tmp_path / "bf16", "release", dtype=torch.bfloat16)  # exact back: bf16 → fp32 → bf16
    assert_same_tensors(torch.load(tmp_path / "bf16" / "pytorch_model.bin", weights_only=True)["model"], original)


def test_convert_command(release, tmp_path, capsys):
    assert main(["convert", str(release), str(tmp_path / "out"), "--to", "hf", "--max-shard-size", "30KB"]) == 0
    assert "(release format) →" in capsys.readouterr().out
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) >= 2
    # a non-empty destination is never overwritten; unreadable sizes and formats the release cannot hold fail
    assert main(["convert", str(release), str(tmp_path / "out"), "--to", "native"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(release), str(tmp_path / "x"), "--to", "native", "--max-shard-size", "big"]) == 2
    assert "not a size" in capsys.readouterr().err
    attn = tmp_path / "attn"
    tiny_model(layers=["r", "a"]).save_pretrained(attn)
    assert main(["convert", str(attn), str(tmp_path / "y"), "--to", "release"]) == 2
    assert "attention layers" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.*"))  # nothing half-written


def test_convert_rejects_checkpoints_that_do_not_fit(native, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((native / "config.json").read_bytes())
    sd = load_file(str(native / "model.safetensors"))
    sd["decoder.layers.0.mixer.D"] = torch.zeros(3)
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(blackmamba.CheckpointError, match=r"wrong shape for decoder.layers.0.mixer.D"):
        convert(bad, tmp_path / "out", "release")


@pytest.mark.parametrize("case", ["read-only", "full", "file-size"])
def test_an_unwritable_or_full_destination_is_one_line_and_leaves_nothing(release, tmp_path, case):
    import subprocess
    import sys

    from support.oslimits import file_size_limit, private_mount

    prefix, preexec, dst = [], None, tmp_path / "out"
    if case == "file-size":
        preexec = file_size_limit(20_000)  # the first tensor file fails to write, as on a full disk
        expected = "could not write the checkpoint (File too large); nothing was left there"
    else:
        prefix, mnt = private_mount(tmp_path, "ro" if case == "read-only" else "size=16k")
        dst = mnt / "out"
        expected = "cannot write there (Read-only file system)" if case == "read-only" else "are free there"
    env = checkout_env()
    proc = subprocess.run([*prefix, sys.executable, "-m", "blackmamba", "convert", str(release), str(dst),
                           "--to", "native", "--dtype", "float32"], env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=preexec)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and expected in err and err.count("\n") == 0, err
    assert not dst.exists() and not list(dst.parent.glob(".out.*"))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("123") == 123
    assert parse_size("1.5 MB") == 1_500_000
    with pytest.raises(ValueError):
        parse_size("5 parsecs")
