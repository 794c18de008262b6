"""``blackmamba bench --quantize --quick``: the rows it promises, the accuracy on a run folder's held-out text
measured against an independent computation, the memory child, and the flag checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from support.text import corpus_dir, isolated_cache, one_thread  # noqa: F401  (fixtures)

from blackmamba.bench.quant import bench_accuracy, held_out_windows
from blackmamba.checkpoint import load_pretrained
from blackmamba.cli import main


@pytest.fixture
def run_dir(tmp_path, corpus_dir):  # noqa: F811  (the fixture imported above)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data", str(corpus_dir), "--preset", "tiny", "--no-progress",
                 "--steps", "6", "--set", "data.vocab_size=300", "--set", "data.seq_len=32",
                 "--set", "optim.batch_size=4", "--set", "train.sample_tokens=0"]) == 0
    return out


def test_quick_bench_end_to_end(run_dir, tmp_path, capsys):
    out = tmp_path / "q.json"
    assert main(["bench", "--quantize", "--quick", "--model", str(run_dir), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    names = [r["bench"] for r in result["rows"]]
    assert sum("decode B=1 int8" in n for n in names) == 2 and sum("decode B=1 int4" in n for n in names) == 2
    bound = [r for r in result["rows"] if r["bench"].startswith("int4 decode, bound once a generation")]
    assert [r["baseline"] for r in bound] == ["the same, each kernel called from Python (BLACKMAMBA_CPU_REPLAY=0)",
                                              "the same, bound every token (model.step)"]
    assert all(r["value"] > 0 and r["ratio"] > 0 for r in bound)
    heads = [r for r in result["rows"] if r["bench"].startswith("LM head alone")]
    assert [r["bench"].rsplit(", ", 1)[1] for r in heads] == ["bfloat16 weights", "int8 weights", "int4 weights"]
    assert all(r["unit"] == "GB/s" and r["value"] > 0 and r["ratio"] > 0 for r in heads)
    assert any(n.startswith("int4 tiny (random weights) loaded") for n in names)
    assert all(r["met"] is None for r in result["rows"])  # --quick judges no target
    m = result["memory"]
    assert m["rss_before"] > 0 and 0 < m["model_bytes"] < m["bf16_bytes"]
    acc = result["accuracy"]
    assert 0.5 < acc["int8"]["top1_agreement"] <= 1 and acc["int8"]["mean_kl_nats"] >= 0
    assert acc["int8"]["mean_kl_nats"] < acc["int4"]["mean_kl_nats"]


def test_accuracy_against_an_independent_computation(run_dir):
    """bits per byte and agreement recomputed here from the models' logits over the same windows."""
    rows, acc = bench_accuracy(run_dir, quick=True)
    ids, tok = held_out_windows(run_dir, 2)
    fp32, q8 = load_pretrained(run_dir), load_pretrained(run_dir, quantize="int8")
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        a, b = fp32(x).logits.float(), q8(x).logits.float()
    nbytes = sum(len(tok.decode(w.tolist()).encode()) for w in y)
    nll = F.cross_entropy(a.reshape(-1, a.shape[-1]), y.reshape(-1), reduction="sum").item()
    assert acc["float32"]["bpb"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)
    assert acc["int8"]["top1_agreement"] == pytest.approx((a.argmax(-1) == b.argmax(-1)).float().mean().item())
    kl = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="sum").item() / y.numel()
    assert acc["int8"]["mean_kl_nats"] == pytest.approx(kl, rel=1e-4, abs=1e-7)


def test_flag_checks(capsys, tmp_path):
    assert main(["bench", "--quantize", "--serve"]) == 2
    assert "different benchmarks" in capsys.readouterr().err
    assert main(["bench", "--quantize", "--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().err
    from blackmamba.bench.quant import bench_accuracy as acc

    with pytest.raises(ValueError, match="needs a run folder"):
        acc(tmp_path, quick=True)


def test_quantize_on_load_equals_a_converted_checkpoint(run_dir, tmp_path, capsys):
    """generate --quantize int4 on the run folder gives the text the converted int4 checkpoint gives."""
    args = ["ROMEO.", "--greedy", "--max-new-tokens", "12"]
    assert main(["generate", str(run_dir), *args, "--quantize", "int4"]) == 0
    on_load = capsys.readouterr().out
    assert main(["convert", str(run_dir), str(tmp_path / "q4"), "--quantize", "int4"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "q4"), *args]) == 0
    assert capsys.readouterr().out == on_load and on_load.strip()
    assert main(["generate", str(tmp_path / "q4"), *args, "--quantize", "int8"]) == 2
    assert "holds int4 weights" in capsys.readouterr().err
