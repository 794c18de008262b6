"""Quantized models (``blackmamba.quantize``): which layers are quantized, the model computes exactly what the
dequantized weights compute, decode (step) agrees with forward on every backend, checkpoints load back as stored
without re-quantizing, and the places a quantized model cannot go refuse in one line."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.models import SMALL, random_model

from blackmamba import BlackMambaConfig, load_pretrained
from blackmamba.checkpoint import CheckpointError
from blackmamba.cli import main
from blackmamba.layers.quantized import QuantizedLinear
from blackmamba.ops import set_backend
from blackmamba.ops.quant import quantize_activation, quantize_weight
from blackmamba.quantize import QUANTIZATION_NAME, Quantization, quantize_model

PATTERN = dict(SMALL, layers=["r", "8", "a", "1", "r", "3"])  # every layer kind


class Dequantized(torch.nn.Module):
    """What a quantized linear layer computes, as a plain module: its input (int4: quantized per group, as the
    product defines it) times the dequantized weight."""

    def __init__(self, weight, mode: str, group_size: int):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.mode, self.group_size = mode, group_size

    def forward(self, x):
        return torch.nn.functional.linear(product_input(x, self.mode, self.group_size), self.weight)


def product_input(x, mode: str, group_size: int = 32):
    """x as an int8 / int4 product multiplies it (ops/quant.py): int4 quantizes it to int8 per weight group, int8
    to int16 per 128 inputs."""
    return quantize_activation(x, group_size) if mode == "int4" else quantize_activation(x, 128, 32767)


# (max, mean) of |step - forward| as fractions of the largest logit
STEP_TOLERANCE = {"int8": (1e-3, 2e-4), "int4": (0.05, 0.01)}


def assert_step_matches(step_logits, forward_logits, mode: str):
    """A decode step's logits against the forward's. Each product quantizes its input (ops/quant.py: int8 to
    int16, int4 to int8), and the two paths' float32 roundings differ upstream: where an input sits on a rounding
    boundary, one path's rounds up and the other's down, one step of that group's scale (max|x| / 32767 or / 127)
    apart, which the layers after carry on. Seen, as fractions of the largest logit: int8 up to 1.9e-4 (max) and
    2.9e-5 (mean) over 240 random models, int4 1.5 % and 0.2 % over 144; a wrong scale or group would be of the
    logits' own size."""
    scale, err = forward_logits.abs().max().item(), (step_logits - forward_logits).abs()
    worst, mean = STEP_TOLERANCE[mode]
    assert err.max().item() <= worst * scale and err.mean().item() <= mean * scale, (err.max().item(), scale)


def dequantized_copy(model, mode: str, group_size: int = 32):
    """An independent full-precision model whose quantized layers are replaced by ``Dequantized`` modules (what
    the quantized model must compute), and the head's dequantized weight."""
    ref = copy.deepcopy(model)
    names = [name for name, mod in ref.named_modules()
             if type(mod) is torch.nn.Linear and name.endswith(("in_proj", "x_proj", "out_proj", "linear_fc1",
                                                                  "linear_fc2", "qkv_proj"))]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        lin = getattr(ref.get_submodule(parent), leaf)
        w = quantize_weight(lin.weight.detach(), mode, group_size).dequantize()
        setattr(ref.get_submodule(parent), leaf, Dequantized(w, mode, group_size))
    head = quantize_weight(ref.embedding.word_embeddings.weight, mode, group_size).dequantize()
    return ref, head


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_quantized_layers_and_what_they_compute(mode):
    model = random_model(BlackMambaConfig(**PATTERN))
    ref, head = dequantized_copy(model, mode)
    q = quantize_model(copy.deepcopy(model), mode)
    names = sorted(n for n, m in q.named_modules() if isinstance(m, QuantizedLinear))
    assert names[:3] == ["decoder.layers.0.mixer.in_proj", "decoder.layers.0.mixer.out_proj",
                         "decoder.layers.0.mixer.x_proj"]
    assert "decoder.layers.2.mixer.qkv_proj" in names and "decoder.layers.3.mixer.linear_fc1" in names
    assert "decoder.layers.1.mixer.local_experts.7.linear_fc2" in names and "output_layer" in names
    # 2 Mamba × 3 + attention 2 + MLP 2 + experts (8 + 3) × 2 + head
    assert len(names) == 6 + 2 + 2 + 22 + 1
    # kept: routers, dt_proj, the conv, A_log, D, norms, the embedding rows
    kept = {n for n, _ in q.named_parameters()}
    assert {"decoder.layers.1.mixer.router.weight", "decoder.layers.0.mixer.dt_proj.weight",
            "decoder.layers.0.mixer.A_log", "embedding.word_embeddings.weight"} <= kept
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = ref.embedding.word_embeddings(ids)  # the reference: dequantized layers, the head on its quantized copy
        residual = None
        for blk in ref.decoder.layers:
            h, residual = blk(h, residual)
        expected = torch.nn.functional.linear(product_input(ref.decoder.final_layernorm(h + residual), mode), head)
        for backend in ("reference", "cpu"):
            set_backend(backend)
            try:
                got = q(ids).logits
            finally:
                set_backend(None)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert not q.training and not any(p.requires_grad for p in q.parameters())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_decode_steps_equal_the_forward(mode):
    q = quantize_model(random_model(BlackMambaConfig(**PATTERN)), mode)
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(2))
    full = q(ids).logits
    state = q.new_state(3)
    q(ids[:, :6], state=state)
    for t in range(6, 12):
        assert_step_matches(q.step(ids[:, t], state), full[:, t], mode)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_embedding_is_what_the_tied_head_reads(mode):
    model = random_model(BlackMambaConfig(**SMALL))
    table = quantize_weight(model.embedding.word_embeddings.weight, mode).dequantize()
    ref, _ = dequantized_copy(model, mode)  # the other layers as the quantized model has them
    with torch.no_grad():
        ref.embedding.word_embeddings.weight.copy_(table)  # the table, dequantized: rows and head alike
    q = quantize_model(copy.deepcopy(model), mode, head=True, embedding=True)
    assert q.output_layer is None  # no copy: the head reads the quantized table
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    rows = q.embedding.word_embeddings(ids)
    assert rows.dtype == torch.float32 and torch.equal(rows, table[ids])
    with torch.no_grad():
        h, residual = ref.embedding.word_embeddings(ids), None
        for blk in ref.decoder.layers:
            h, residual = blk(h, residual)
        expected = torch.nn.functional.linear(product_input(ref.decoder.final_layernorm(h + residual), mode), table)
        torch.testing.assert_close(q(ids).logits, expected, rtol=1e-5, atol=1e-4)
    assert q.weight_bytes() < quantize_model(copy.deepcopy(model), mode).weight_bytes()


def test_the_full_precision_weights_are_released_before_memory_is_handed_back(monkeypatch):
    """quantize_model hands freed memory back to the OS (malloc_trim) once no full-precision weight of a replaced
    layer is referenced any more: trimmed earlier, their memory would stay in the resident set."""
    import weakref

    import blackmamba.quantize as quantize

    model = random_model(BlackMambaConfig(**PATTERN))
    refs = [weakref.ref(m.weight) for n, m in model.named_modules()
            if type(m) is torch.nn.Linear and n.endswith(("in_proj", "linear_fc1", "linear_fc2"))]
    alive = []
    monkeypatch.setattr(quantize, "release_freed_memory", lambda: alive.append(sum(r() is not None for r in refs)))
    quantize_model(model, "int4")
    assert len(refs) > 10 and alive == [0]


def test_memory_shrinks_as_the_format_says():
    cfg = BlackMambaConfig(**dict(SMALL, hidden_size=64, ffn_hidden_size=128))
    fp32 = random_model(cfg)
    q8, q4 = (quantize_model(random_model(cfg), m) for m in ("int8", "int4"))
    mixers = [sum(t.numel() * t.element_size() for t in m.decoder.layers[0].mixer.in_proj.buffers())
              for m in (q8, q4)]
    H, inner = 64, 128
    assert mixers == [2 * inner * H + 4 * 2 * inner, 2 * inner * H // 2 + 2 * (2 * inner) * (H // 32)]  # + scales
    assert q4.weight_bytes() < q8.weight_bytes() < 0.45 * fp32.weight_bytes()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_checkpoint_loads_back_as_stored_without_requantizing(tmp_path, monkeypatch, mode):
    q = quantize_model(random_model(BlackMambaConfig(**PATTERN)), mode, group_size=64 if mode == "int4" else 32)
    q.save_pretrained(tmp_path)
    assert json.loads((tmp_path / QUANTIZATION_NAME).read_text()) == {
        "mode": mode, "group_size": 64 if mode == "int4" else 32, "head": True, "embedding": False}
    monkeypatch.setattr("blackmamba.layers.quantized.quantize_weight", lambda *a, **k: pytest.fail("re-quantized"))
    back = load_pretrained(tmp_path)
    assert back.quantization == q.quantization
    sd, sd2 = q.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert sd2["decoder.layers.0.mixer.in_proj.weight_q"].dtype == (torch.int8 if mode == "int8" else torch.uint8)
    ids = torch.randint(0, 97, (1, 10))
    assert torch.equal(back(ids).logits, q(ids).logits)
    # the weights left unquantized follow dtype=; the quantized bytes and scales do not
    bf = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    scales = [m.decoder.layers[0].mixer.in_proj.weight_scales for m in (bf, q)]
    assert torch.equal(*scales)


@settings(max_examples=8, deadline=None)
@given(mode=st.sampled_from(["int8", "int4"]), group=st.sampled_from([32, 64]), head=st.booleans(),
       embedding=st.booleans(), tie=st.booleans(), hidden=st.sampled_from([16, 40, 48]), seed=st.integers(0, 100))
def test_round_trip_property(tmp_path_factory, mode, group, head, embedding, tie, hidden, seed):
    """Any pattern, width (odd groups included), tied or untied head, quantized embedding or not: save → load
    gives the same logits, forward and step."""
    cfg = BlackMambaConfig(**dict(PATTERN, hidden_size=hidden, ffn_hidden_size=hidden + 8, tie_embeddings=tie,
                                  num_heads=4))
    q = quantize_model(random_model(cfg, seed), mode, group, head=head, embedding=embedding)
    folder = tmp_path_factory.mktemp("q")
    q.save_pretrained(folder)
    back = load_pretrained(folder)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(seed))
    logits = q(ids).logits
    assert torch.equal(back(ids).logits, logits)
    assert (back.output_layer is None) == (tie and (embedding or not head))
    state = back.new_state(2)
    back(ids[:, :-1], state=state)
    assert_step_matches(back.step(ids[:, -1], state), logits[:, -1], mode)


def test_refusals(tmp_path):
    model = random_model(BlackMambaConfig(**SMALL))
    model.save_pretrained(tmp_path / "fp")
    q = quantize_model(copy.deepcopy(model), "int8")
    q.save_pretrained(tmp_path / "q8")
    with pytest.raises(CheckpointError, match="holds int8 weights, not int4: it loads as stored"):
        load_pretrained(tmp_path / "q8", quantize="int4")
    assert load_pretrained(tmp_path / "q8", quantize="int8").quantization.mode == "int8"
    quantize_model(copy.deepcopy(model), "int4", 64).save_pretrained(tmp_path / "q4")
    with pytest.raises(CheckpointError, match="holds int4 weights in groups of 64, not 32"):
        load_pretrained(tmp_path / "q4", quantize="int4")  # (the default group size)
    assert load_pretrained(tmp_path / "q4", quantize="int4", group_size=64).quantization.group_size == 64
    assert load_pretrained(tmp_path / "q4").quantization == Quantization("int4", 64)
    with pytest.raises(CheckpointError, match="quantize = 'int3'"):
        load_pretrained(tmp_path / "fp", quantize="int3")
    with pytest.raises(CheckpointError, match="group_size = 48"):
        load_pretrained(tmp_path / "fp", quantize="int4", group_size=48)
    with pytest.raises(ValueError, match="inference only"):
        q.train()
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, "int4")
    from blackmamba import save_release

    with pytest.raises(CheckpointError, match="full-precision weights only"):
        save_release(q, tmp_path / "rel")
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "q4" / "model.safetensors")
    name = "decoder.layers.0.mixer.in_proj.weight_scales"
    sd[name] = sd[name].float()  # float32 scales where the format stores float16
    save_file(sd, tmp_path / "q4" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"wrong dtype for {name}: expected torch.float16, found torch.float32"):
        load_pretrained(tmp_path / "q4")
    (tmp_path / "q8" / QUANTIZATION_NAME).write_text('{"mode": "int8", "bits": 3}')
    with pytest.raises(CheckpointError, match="not a quantization description"):
        load_pretrained(tmp_path / "q8")


def test_quantization_settings_are_checked():
    assert Quantization("int4", 64).to_dict() == {"mode": "int4", "group_size": 64, "head": True, "embedding": False}
    with pytest.raises(ValueError):
        Quantization("int4", 16)


def test_convert_cli(tmp_path, capsys):
    model = random_model(BlackMambaConfig(**SMALL))
    model.save_pretrained(tmp_path / "fp")
    assert main(["convert", str(tmp_path / "fp"), str(tmp_path / "q4"), "--quantize", "int4"]) == 0
    assert "native format, int4 quantized" in capsys.readouterr().out
    q4 = load_pretrained(tmp_path / "q4")
    assert q4.quantization == Quantization("int4", 32, True)
    size = lambda d: sum(p.stat().st_size for p in d.iterdir())  # noqa: E731
    assert size(tmp_path / "q4") < 0.3 * size(tmp_path / "fp")
    for src, argv, message in (("fp", ["--quantize", "int8", "--to", "release"], "--quantize writes the native format"),
                               ("q4", ["--to", "release"], "holds int4 weights: it converts to the native format only"),
                               ("q4", ["--quantize", "int4", "--group-size", "64"], "group size or embedding"),
                               ("q4", ["--quantize", "int4", "--quantize-embedding"], "group size or embedding")):
        src = tmp_path / src
        r = subprocess.run([sys.executable, "-m", "blackmamba", "convert", str(src), str(tmp_path / "out"), *argv],
                           capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_failed_quantization_leaves_the_model_as_it_was(tmp_path):
    model = random_model(BlackMambaConfig(**SMALL))
    with torch.no_grad():
        model.decoder.layers[4].mixer.out_proj.weight[0, 0] = float("nan")  # the last Mamba layer
    with pytest.raises(ValueError, match="non-finite weights"):
        quantize_model(model, "int8")
    assert model.quantization is None
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="cannot quantize: the model has non-finite weights"):
        load_pretrained(tmp_path, quantize="int4")


def test_casts_keep_the_format_and_wrappers_keep_their_call():
    q = quantize_model(random_model(BlackMambaConfig(**SMALL)), "int4")
    ids = torch.randint(0, 97, (1, 5))
    before = q(ids).logits
    q.to(torch.float64).to(torch.float32)  # casts the weights; the bytes and scales keep the format
    lin = q.decoder.layers[0].mixer.in_proj
    assert lin.weight_scales.dtype == torch.float16 and lin.weight_q.dtype == torch.uint8
    torch.testing.assert_close(q(ids).logits, before)
    from blackmamba.ops.linear import operand

    class Wrapper(torch.nn.Module):  # forwards .weight, as PEFT's layers do, and adds to the output
        def __init__(self, base):
            super().__init__()
            self.base = base

        @property
        def weight(self):
            return self.base.weight

        def forward(self, x):
            return self.base(x) + 1

    assert operand(lin) is lin.weight and operand(Wrapper(lin)).__class__ is Wrapper
