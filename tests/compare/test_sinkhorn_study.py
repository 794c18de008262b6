"""The Sinkhorn study: its per-iteration trace agrees with ``sinkhorn`` itself, the result is JSON, the figure and
the table are written."""

import json

import torch

from blackmamba.compare.sinkhorn import (iterations_to_stop, plot_study, study, summarize, synthetic_logits,
                                         trace)
from blackmamba.ops.sinkhorn import DELTA_TOL, balance_metrics, sinkhorn


def test_synthetic_logits():
    a = synthetic_logits(2000, 8, temperature=2.0, seed=3)
    assert a.shape == (2000, 8) and torch.equal(a, synthetic_logits(2000, 8, temperature=2.0, seed=3))
    assert abs(a.std().item() - 2.0) < 0.1
    skewed = synthetic_logits(2000, 8, temperature=1.0, seed=3, skew=2.0)
    load = torch.bincount(skewed.argmax(1), minlength=8)
    assert load.argmax().item() == 7 and load.max().item() * 8 / 2000 > 2  # the last expert is preferred


def test_trace_follows_sinkhorn_and_finds_the_stop():
    L = synthetic_logits(512, 8, temperature=1.0, seed=1, skew=2.0)
    for variant in ("vanilla", "blackmamba"):
        rows = trace(L, variant, iters=12)
        assert [r["iteration"] for r in rows] == list(range(13)) and rows[0]["delta"] is None
        for k in (0, 1, 5, 12):
            plan, n = sinkhorn(L, variant, tol=0.0, max_iters=k)
            assert rows[k] == {"iteration": k, "delta": rows[k]["delta"], **balance_metrics(plan)}
        stop = iterations_to_stop(L, variant)
        first = next(r["iteration"] for r in rows[1:] if r["delta"] < DELTA_TOL)  # the delta rule, from the trace
        assert stop["delta"]["iterations"] == first and stop["delta"]["fired"]
        assert stop["marginal"]["row_err"] < 1e-2 + 1e-5 and stop["marginal"]["fired"]


def test_study_is_json_and_plots(tmp_path):
    real = {"layer 1": torch.randn(2, 64, 8) + torch.linspace(0, 3, 8)}  # (b, l, E): flattened to (128, 8)
    result = study(real, tokens=256, experts=8, temperatures=(0.5, 2.0), seed=0, skew=2.0, iters=10)
    result = json.loads(json.dumps(result, allow_nan=False))
    assert list(result["cases"]) == ["layer 1", "gaussian t=0.5", "gaussian t=2", "skewed t=1 bias 0..2"]
    case = result["cases"]["layer 1"]
    assert case["source"] == "real" and case["tokens"] == 128 and case["top1_max_load"] > 1.5
    for case in result["cases"].values():
        for variant in ("vanilla", "blackmamba"):
            run = case["variants"][variant]
            assert set(run["stop"]) == {"delta", "marginal"}
            assert all(len(v) == 11 for v in run["curves"].values())
    assert result["cases"]["gaussian t=0.5"]["variants"]["blackmamba"]["stop"]["delta"]["iterations"] == 1
    path = plot_study(result, tmp_path / "sinkhorn.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    table = summarize(result)
    assert table.count("| vanilla |") == 4 and table.count("| blackmamba |") == 4
    assert "| layer 1 |" in table
