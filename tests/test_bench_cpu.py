"""``blackmamba bench --quick``: the CPU benchmark runs end to end at toy sizes and writes its JSON."""

import json

import pytest

from blackmamba.bench.cpu import TARGETS, Paired, best_time, bytes_per_token, paired_ratios, row
from blackmamba.cli import main


def test_quick_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["quick"] is True
    assert result["machine"]["copy_bandwidth_bytes_per_s"] > 0 and result["machine"]["torch_exp_per_s"] > 0
    names = " ".join(r["bench"] for r in result["rows"])
    for part in ("scan fwd ", "scan fwd+bwd", "mixer", "prefill", "decode B=1 float32", "decode B=1 bfloat16",
                 "decode latency", "MoE"):
        assert part in names, part
    for r in result["rows"]:
        assert r["value"] > 0
        assert r["met"] is None  # quick mode judges no target
        assert r["bench"][:20] in text
    paired = [r for r in result["rows"] if r["ratio_quartiles"] is not None]  # medians of paired samples
    assert {r["bench"].split()[0] for r in paired} == {"scan", "decode", "MoE"}
    for r in paired:
        lo, hi = r["ratio_quartiles"]
        assert lo <= r["ratio"] <= hi, r
    acc = result["bf16_decode_accuracy"]
    assert 0 <= acc["top1_agreement"] <= 1 and acc["mean_kl_nats"] >= 0


def test_targets_are_judged_on_the_ratio():
    rows = []
    row(rows, "a", 1.0, "tok/s", "base", 25.0, "scan_vs_hf")
    row(rows, "b", 1.0, "× dense", "base", 1.2, "moe_vs_dense")
    row(rows, "c", 1.0, "tok/s", "base", 25.0, "scan_vs_hf", quick=True)
    assert [r["met"] for r in rows] == [True, False, None]
    assert rows[0]["target"] == "≥ 20" and rows[1]["target"] == "≤ 1.1"
    assert set(TARGETS) >= {"scan_vs_exp_bound", "decode_vs_roofline", "decode_context"}


def test_bytes_per_token_counts_weights_and_state():
    import torch

    from blackmamba import BlackMambaConfig, BlackMambaLM

    m = BlackMambaLM(BlackMambaConfig(layers=["r", "r"], hidden_size=16, vocab_size=32))
    weights = sum(p.numel() * 4 for p in m.parameters())
    assert bytes_per_token(m) == weights + 2 * m.new_state(1).nbytes()
    assert best_time(lambda: torch.ones(3).sum(), reps=2) > 0


def test_bad_threads_is_a_clear_error(capsys):
    assert main(["bench", "--quick", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--device"])
def test_unknown_device_is_rejected(flag):
    with pytest.raises(SystemExit):
        main(["bench", flag, "tpu"])


def test_paired_ratios_visit_the_pairs_in_turn_and_report_quartiles():
    calls = []
    pairs = {key: (lambda k=key: calls.append(k + "a"), lambda k=key: calls.append(k + "b")) for key in "xy"}
    out = paired_ratios(pairs, reps=3)
    # one untimed call of each, then rounds that time every pair once: a pair's samples spread over the run
    assert calls == ["xa", "xb", "ya", "yb"] * 4
    assert set(out) == {"x", "y"} and all(len(p.ratios) == 3 and p.best_a > 0 for p in out.values())
    p = Paired([1.0, 5.0, 2.0, 4.0, 3.0], 1.0, 1.0)
    assert p.median == 3.0 and p.quartiles() == (2.0, 4.0)
    assert Paired([1.5], 1.0, 1.0).quartiles() == (1.5, 1.5)
    assert p.per(6.0) == (2.0, (1.5, 3.0))  # a rate: the time ratios' quartiles swap ends
    rows = []
    row(rows, "m", 1.0, "ms", "dense", p.median, "moe_vs_dense", spread=p.quartiles())
    assert rows[0]["ratio_quartiles"] == [2.0, 4.0] and rows[0]["met"] is False
