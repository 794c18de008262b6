"""``blackmamba bench``: the harness (paired ratios, targets, the table), the CPU sections end to end at toy sizes
with their JSON, and the GPU benchmark's bookkeeping (its measurements need a GPU)."""

import json
import time

import pytest
import torch

import blackmamba
from blackmamba.bench.cpu import TARGETS
from blackmamba.bench.gpu import run_gpu_bench, scan_bytes, time_fn
from blackmamba.bench.harness import Paired, best_time, decode_bytes_per_token, format_table, paired_ratios, row
from blackmamba.cli import main


def test_quick_cpu_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["quick"] is True
    assert result["machine"]["copy_bandwidth_bytes_per_s"] > 1e8 and result["machine"]["torch_exp_per_s"] > 1e6
    assert result["machine"]["cpu"] and f"machine: {result['machine']['cpu']}, " in text  # what the numbers ran on
    names = " ".join(r["bench"] for r in result["rows"])
    for part in ("scan fwd ", "scan fwd+bwd", "mixer", "prefill", "decode B=1 float32", "decode B=1 bfloat16",
                 "decode latency", "MoE"):
        assert part in names, part
    for r in result["rows"]:
        assert r["met"] is None  # quick mode judges no target
        assert r["bench"][:20] in text
    paired = [r for r in result["rows"] if r["ratio_quartiles"] is not None]  # medians of paired samples
    assert {r["bench"].split()[0] for r in paired} == {"scan", "decode", "MoE"}
    for r in paired:
        lo, hi = r["ratio_quartiles"]
        assert lo <= r["ratio"] <= hi, r
    acc = result["bf16_decode_accuracy"]
    assert acc["top1_agreement"] >= 0.9 and acc["mean_kl_nats"] < 1e-2  # bf16 weights barely move the logits
    assert "top-1 agreement" in text


def test_targets_are_judged_on_the_ratio():
    rows = []
    row(rows, "a", 1.0, "tok/s", "base", 25.0, TARGETS["scan_vs_hf"])
    row(rows, "b", 1.0, "× dense", "base", 1.2, TARGETS["moe_vs_dense"])
    row(rows, "c", 1.0, "tok/s", "base", 25.0, TARGETS["scan_vs_hf"], quick=True)
    assert [r["met"] for r in rows] == [True, False, None]
    assert rows[0]["target"] == "≥ 20" and rows[1]["target"] == "≤ 1.1"
    table = format_table({"rows": rows, "notes": ["a note"]})
    assert " ok" in table.splitlines()[2] and " MISSED" in table.splitlines()[3] and table.endswith("a note")


def test_best_time_is_the_fastest_run():
    naps = iter([0.03, 0.01, 0.02])
    t = best_time(lambda: time.sleep(next(naps)), reps=2, warmup=1)  # the first nap is the warm-up
    assert 0.01 <= t < 0.02


def test_decode_bytes_read_one_expert_per_token_and_the_state():
    model = blackmamba.BlackMambaLM(blackmamba.preset("tiny"))  # layers r,4,r,4
    per_expert = sum(p.numel() * 4 for p in model.decoder.layers[1].mixer.local_experts[0].parameters())
    all_weights = sum(p.numel() * 4 for p in model.parameters())
    state = model.new_state(1).nbytes()
    assert decode_bytes_per_token(model, 1) == all_weights - 2 * 3 * per_expert + 2 * state
    assert decode_bytes_per_token(model, 8) == all_weights + 2 * model.new_state(8).nbytes()


def test_bad_options_are_clear_errors(capsys):
    assert main(["bench", "--quick", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "tpu"])
    assert e.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err


def test_paired_ratios_visit_the_pairs_in_turn_and_report_quartiles():
    calls = []
    pairs = {key: (lambda k=key: calls.append(k + "a"), lambda k=key: calls.append(k + "b")) for key in "xy"}
    out = paired_ratios(pairs, reps=3)
    # one untimed call of each, then rounds that time every pair once: a pair's samples spread over the run
    assert calls == ["xa", "xb", "ya", "yb"] * 4
    assert set(out) == {"x", "y"} and all(len(p.ratios) == 3 for p in out.values())
    p = Paired([1.0, 5.0, 2.0, 4.0, 3.0], 1.0, 1.0)
    assert p.median == 3.0 and p.quartiles() == (2.0, 4.0)
    assert Paired([1.5], 1.0, 1.0).quartiles() == (1.5, 1.5)
    assert p.per(6.0) == (2.0, (1.5, 3.0))  # a rate: the time ratios' quartiles swap ends
    rows = []
    row(rows, "m", 1.0, "ms", "dense", p.median, TARGETS["moe_vs_dense"], spread=p.quartiles())
    assert rows[0]["ratio_quartiles"] == [2.0, 4.0] and rows[0]["met"] is False


def test_gpu_scan_bytes_count_the_big_tensors():
    b, l, d, n = 2, 3, 5, 4
    fwd = scan_bytes(b, l, d, n, 2, backward=False)
    assert fwd == 4 * b * l * d * 2 + 2 * b * l * n * 2 + d * n * 4 + d * 4 + b * d * n * 4
    both = scan_bytes(b, l, d, n, 2, backward=True)
    assert both - fwd == 7 * b * l * d * 2 + 4 * b * l * n * 2 + 2 * (d * n * 4 + d * 4)


def test_gpu_time_fn_is_the_median_on_cpu():
    naps = iter([0.0, 0.01, 0.03, 0.02])
    t = time_fn(lambda: time.sleep(next(naps)), torch.device("cpu"), warmup=1, iters=3)
    assert 0.02 <= t < 0.03


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_bench_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match="no CUDA device"):
        run_gpu_bench(quick=True)
    assert main(["bench", "--device", "cuda"]) == 2 and "no CUDA device" in capsys.readouterr().err


def test_cpu_description_names_the_model_and_its_vector_extensions(tmp_path, monkeypatch):
    import blackmamba.bench.cpu as cpu_bench
    from blackmamba.ops.cpu.build import cpu_info

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
                    "model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma avx512f\n\n"
                    "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    assert cpu_info(info)["model name"] == "AMD EPYC"  # the first processor's block
    assert cpu_info(tmp_path / "absent") == {}
    monkeypatch.setattr(cpu_bench, "cpu_info", lambda: cpu_info(info))
    assert cpu_bench.cpu_description() == "AMD EPYC, family 25 model 1 (avx512f, avx2)"
    monkeypatch.setattr(cpu_bench, "cpu_info", lambda: {})  # not Linux: the platform's names
    assert cpu_bench.cpu_description()
