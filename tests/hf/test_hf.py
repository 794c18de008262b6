"""transformers integration: config, auto classes, forward / cache parity, generate(), save / load."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

pytestmark = pytest.mark.ecosystem  # also run against the lowest declared transformers / peft / lm-eval

pytest.importorskip("transformers")

from support.env import checkout_env
from support.ecosystem import tiny_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (AutoConfig, AutoModelForCausalLM, DynamicCache, StoppingCriteria,  # noqa: E402
                          StoppingCriteriaList)
from transformers.generation.streamers import BaseStreamer  # noqa: E402

import blackmamba  # noqa: E402
from blackmamba.generation import pad_prompts  # noqa: E402
from blackmamba.hf import BlackMambaCache, BlackMambaConfig, BlackMambaForCausalLM  # noqa: E402
from blackmamba.hf.modeling import CACHE_FIELD  # noqa: E402

PAD = 0


@pytest.fixture(scope="module")
def lm():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def hf(lm):
    return BlackMambaForCausalLM.from_core(lm)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, 320, (n,), generator=g).tolist() for n in (7, 3, 5)]


# ----------------------------------------------------------------------------- config
def test_config_has_exactly_the_core_fields_and_defaults():
    hf_fields = {f.name: f for f in dataclasses.fields(BlackMambaConfig)}
    core = blackmamba.BlackMambaConfig()
    for f in dataclasses.fields(blackmamba.BlackMambaConfig):
        assert f.name in hf_fields, f.name
        assert getattr(BlackMambaConfig(), f.name) == getattr(core, f.name), f.name
    cfg = BlackMambaConfig(layers=["r", "16", "a", "1"], hidden_size=32)
    assert cfg.to_core() == blackmamba.BlackMambaConfig(layers=["r", "16", "a", "1"], hidden_size=32)
    assert cfg.num_hidden_layers == 4


def test_config_rejects_bad_values_with_the_core_message():
    with pytest.raises(blackmamba.ConfigError, match=r"layers\[1\] = 'x'"):
        BlackMambaConfig(layers=["r", "x"])
    with pytest.raises(blackmamba.ConfigError, match="mlp_activation"):
        BlackMambaConfig(mlp_activation="relu")


def test_import_blackmamba_registers_without_importing_transformers(lm, tmp_path):
    """The acceptance path, in a fresh process: import blackmamba, then transformers' auto classes."""
    import subprocess

    lm.save_pretrained(tmp_path)
    env = checkout_env()
    code = ("import sys, torch, blackmamba; assert 'transformers' not in sys.modules; "
            "from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}); "
            "ids = torch.tensor([[3, 4, 5, 6]]); "
            "print(type(m).__name__, *m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0].tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    want = lm.generate(torch.tensor([[3, 4, 5, 6]]), max_new_tokens=6)[0].tolist()
    assert out.stdout.split() == ["BlackMambaForCausalLM", *map(str, want)]


# ----------------------------------------------------------------------------- forward and cache
def test_forward_equals_core_and_chunked_cache_equals_full(lm, hf):
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    full = lm(ids).logits
    out = hf(ids)
    torch.testing.assert_close(out.logits, full, rtol=0, atol=0)
    cache = BlackMambaCache()
    a = hf(ids[:, :5], cache=cache, use_cache=True)
    assert getattr(a, CACHE_FIELD) is cache and cache.get_seq_length() == 5
    b = hf(ids[:, 5:6], cache=cache)  # one-token decode step
    c = hf(ids[:, 6:], cache=cache)
    torch.testing.assert_close(torch.cat([a.logits, b.logits, c.logits], 1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 12
    # a fresh cache made by the forward (use_cache=True) carries on the same way, under either argument name
    made = getattr(hf(ids[:, :5], use_cache=True), CACHE_FIELD)
    d = hf(ids[:, 5:], cache_params=made)
    torch.testing.assert_close(torch.cat([a.logits, d.logits], 1), full, rtol=1e-5, atol=1e-5)


def test_cache_row_operations_follow_the_rows(hf):
    """Beam search reorders the cache; num_return_sequences repeats its rows: each row continues as its source."""
    ids = torch.randint(0, 320, (3, 9), generator=torch.Generator().manual_seed(1))
    cache = BlackMambaCache()
    hf(ids[:, :6], cache=cache)
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    got = hf(ids[[2, 0, 0], 6:], cache=cache).logits
    torch.testing.assert_close(got, hf(ids[[2, 0, 0]]).logits[:, 6:], rtol=1e-5, atol=1e-5)
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 6 and cache.get_seq_length() == 9
    with pytest.raises(ValueError, match="rolled back"):
        cache.crop(-1)


def test_attention_layers_cache_with_left_padding():
    lm = tiny_model(seed=2, layers=["r", "a", "4"])
    hf = BlackMambaForCausalLM.from_core(lm)
    ids, mask = pad_prompts([[5, 6, 7, 8, 9, 10], [11, 12, 13]], pad_id=PAD)
    full = lm(ids, attention_mask=mask).logits
    cache = BlackMambaCache()
    first = hf(ids[:, :4], attention_mask=mask[:, :4], cache=cache).logits
    rest = hf(ids[:, 4:], attention_mask=mask, cache=cache).logits  # mask over past + new, as generate gives
    real = mask.bool()
    torch.testing.assert_close(torch.cat([first, rest], 1)[real], full[real], rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 6


def test_loss_is_the_shifted_causal_lm_loss(lm, hf):
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :3] = -100
    loss = hf(ids, labels=labels).loss
    logits = lm(ids).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 320), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, want)


def test_bad_inputs_are_clear_errors(hf):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"over the 0 cached and the new ones"):
        hf(ids, attention_mask=torch.ones(1, 5, dtype=torch.long))
    cache = BlackMambaCache()
    hf(ids, cache=cache)
    with pytest.raises(ValueError, match="batch size"):
        hf(torch.tensor([[1], [2]]), cache=cache)
    with pytest.raises(TypeError, match="BlackMambaCache"):
        hf(ids, cache=DynamicCache())
    with pytest.raises(TypeError, match="inputs_embeds"):
        hf(ids, inputs_embeds=torch.zeros(1, 3, 32))


# ----------------------------------------------------------------------------- generate
def test_greedy_generate_equals_core_generate_in_padded_batches(lm, hf, prompts):
    ids, mask = pad_prompts(prompts, pad_id=PAD)
    want = lm.generate(ids, max_new_tokens=12, attention_mask=mask)
    got = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    assert got.tolist() == want.tolist()
    uncached = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD,
                           use_cache=False)
    assert uncached.tolist() == want.tolist()


def test_generate_binds_the_decode_step_once_a_call(lm, hf, prompts, monkeypatch):
    from blackmamba.hf import modeling

    ids = torch.tensor([prompts[0]])
    want = lm.generate(ids, max_new_tokens=6)
    binds, steps = [], []
    real = lm.bind_step

    def bind_step():  # counts the bindings and the steps made with each
        step = real()
        binds.append(1)

        def counted(tokens, state):
            steps.append(tokens.tolist())
            return step(tokens, state)

        return counted

    monkeypatch.setattr(lm, "bind_step", bind_step)
    got = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert got.tolist() == want.tolist()
    # one binding for the call; the prefill's forward gives the first token, the bound step the other five
    n = ids.shape[1]
    assert len(binds) == 1 and steps == [[t] for t in want[0, n:-1].tolist()]
    assert modeling._GENERATING.steps == {}  # nothing stays bound after the call...

    class Fails(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD,
                    stopping_criteria=StoppingCriteriaList([Fails()]))
    assert modeling._GENERATING.steps == {}  # ...nor after one that raised
    binds.clear()
    hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD, use_cache=False)
    assert binds == []  # without a cache there is no step to bind
    # a forward outside generate() binds for its own step (the core model's one-token path), as before
    binds.clear()
    cache = BlackMambaCache()
    with torch.no_grad():
        hf(ids, cache=cache)
        hf(want[:, n:n + 1], cache=cache)
    assert len(binds) == 1


def test_beam_search_with_cache_equals_without(hf, prompts):
    ids = torch.tensor([prompts[0]])
    kw = dict(max_new_tokens=8, num_beams=4, num_return_sequences=3, do_sample=False, pad_token_id=PAD,
              early_stopping=True, output_scores=True, return_dict_in_generate=True)
    cached = hf.generate(ids, **kw)
    uncached = hf.generate(ids, use_cache=False, **kw)
    assert cached.sequences.shape == (3, 7 + 8)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=1e-4, atol=1e-4)
    # each beam's score is its log-probability under the model / new tokens (length_penalty 1), and the best
    # beam is at least as likely as the greedy continuation
    def logp(seq):
        return torch.log_softmax(hf(seq[None]).logits[0, 6:-1].float(), -1).gather(1, seq[7:, None]).sum()

    for seq, score in zip(cached.sequences, cached.sequences_scores):
        torch.testing.assert_close(logp(seq) / 8, score, rtol=1e-4, atol=1e-4)
    greedy = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=PAD)[0]
    assert cached.sequences_scores[0] >= logp(greedy) / 8 - 1e-5


def test_sampling_is_seeded_and_matches_uncached(hf, prompts):
    ids = torch.tensor([prompts[1]])
    kw = dict(max_new_tokens=10, do_sample=True, top_k=50, top_p=0.9, temperature=0.8, pad_token_id=PAD)
    torch.manual_seed(11)
    a = hf.generate(ids, **kw)
    torch.manual_seed(11)
    b = hf.generate(ids, use_cache=False, **kw)
    assert a.tolist() == b.tolist()
    assert a.shape == (1, 13) and int(a.max()) < hf.config.vocab_size


def test_streamer_and_stopping_criteria(lm, hf, prompts):
    ids = torch.tensor([prompts[2]])
    want = lm.generate(ids, max_new_tokens=10)[0, 5:].tolist()

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.chunks.append("end")

    streamer = Collect()
    hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=PAD, streamer=streamer)
    assert streamer.chunks[0] == ids[0].tolist()  # the prompt first, then one token per step
    assert sum(streamer.chunks[1:-1], []) == want and streamer.chunks[-1] == "end"

    class AfterFour(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 5 + 4, dtype=torch.bool)

    out = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=PAD,
                      stopping_criteria=StoppingCriteriaList([AfterFour()]))
    assert out[0, 5:].tolist() == want[:4]
    out = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=want[2], pad_token_id=PAD)
    assert out[0, 5:].tolist() == want[: want.index(want[2]) + 1]


# ----------------------------------------------------------------------------- save and load
def test_native_folder_loads_with_auto_classes_and_saves_native_keys(lm, tmp_path):
    lm.save_pretrained(tmp_path / "native")
    cfg = AutoConfig.from_pretrained(tmp_path / "native")
    assert isinstance(cfg, BlackMambaConfig) and cfg.to_core() == lm.config
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    assert isinstance(model, BlackMambaForCausalLM)
    model.save_pretrained(tmp_path / "hf")
    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(saved) == sorted(lm.state_dict())
    for k, v in lm.state_dict().items():
        assert torch.equal(saved[k], v), k
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["architectures"] == ["BlackMambaForCausalLM"] and "auto_map" in written
    back = blackmamba.load_pretrained(tmp_path / "hf")  # a transformers folder is a native folder
    for k, v in lm.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_saved_folder_loads_with_trust_remote_code(lm, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dmu
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    # as in a process that never imported blackmamba: no local registration, the folder's own code
    monkeypatch.delitem(CONFIG_MAPPING._extra_content, "blackmamba")
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    BlackMambaForCausalLM.from_core(lm).save_pretrained(tmp_path / "hf")
    for name in ("configuration.py", "modeling.py", "cache.py"):
        assert (tmp_path / "hf" / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules")
    ids = torch.tensor([[3, 4, 5]])
    assert model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=PAD).tolist() == \
        lm.generate(ids, max_new_tokens=5).tolist()


def test_release_folder_loads_and_dtype_is_kept(lm, tmp_path):
    blackmamba.save_release(lm, tmp_path, dtype=torch.bfloat16)
    model = BlackMambaForCausalLM.from_pretrained(tmp_path)
    assert model.embedding.word_embeddings.weight.dtype == torch.bfloat16
    model32 = BlackMambaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for k, v in lm.state_dict().items():
        assert torch.equal(model32.state_dict()[k], v.to(torch.bfloat16).float()), k
    with pytest.raises(ValueError, match="device_map"):
        BlackMambaForCausalLM.from_pretrained(tmp_path, device_map="auto")


def test_bf16_load_keeps_ssm_parameters_fp32(lm, tmp_path):
    lm.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert dtypes["decoder.layers.0.mixer.A_log"] == torch.float32
    assert dtypes["decoder.layers.0.mixer.D"] == torch.float32
    assert dtypes["decoder.layers.0.mixer.in_proj.weight"] == torch.bfloat16
    assert dtypes["decoder.layers.1.mixer.router.weight"] == torch.bfloat16


def test_loading_is_strict(lm, tmp_path):
    lm.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["decoder.layers.0.mixer.x_proj.weight"]
    sd["decoder.layers.9.extra"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(blackmamba.CheckpointError) as e:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "missing tensor decoder.layers.0.mixer.x_proj.weight" in str(e.value)
    assert "unexpected tensor decoder.layers.9.extra" in str(e.value)


def test_a_quantized_checkpoint_is_refused_in_one_line(lm, tmp_path):
    """A quantized folder (quantization.json) before loading, and quantized tensors without it (what a hub
    repo's download shows once its files are here): one CheckpointError naming the problem."""
    import copy
    import os

    from blackmamba.checkpoint import CheckpointError
    from blackmamba.quantize import QUANTIZATION_NAME, quantize_model

    q = quantize_model(copy.deepcopy(lm), "int8")
    with pytest.raises(CheckpointError, match="int8 quantized model cannot be wrapped"):
        BlackMambaForCausalLM.from_core(q)
    q.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="holds quantized weights: load it with blackmamba.load_pretrained"):
        BlackMambaForCausalLM.from_pretrained(tmp_path)
    os.remove(tmp_path / QUANTIZATION_NAME)
    with pytest.raises(CheckpointError, match="holds quantized weights: load it with blackmamba.load_pretrained"):
        BlackMambaForCausalLM.from_pretrained(tmp_path)
