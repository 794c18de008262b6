"""``blackmamba bench --distributed --quick``: 1 vs 2 torchrun processes at toy size, and the bytes each rank moved
against ``info --world-size``'s estimate (the estimator checked against what gloo really carried)."""

import json

import pytest

from blackmamba.cli import main


def test_quick_distributed_bench_measures_the_estimated_bytes(tmp_path, capsys):
    out = tmp_path / "dist.json"
    assert main(["bench", "--distributed", "--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "2 processes, ep 2: all-to-all per step" in capsys.readouterr().out
    rows = {r["bench"].strip(): r for r in result["rows"]}
    for layout in ("2 processes", "2 processes, ep 2"):
        for kind in ("all-gather", "reduce-scatter", "sinkhorn"):
            r = rows[f"{layout}: {kind} per step (rank 0)"]
            assert r["value"] > 0 and r["ratio"] == pytest.approx(1.0, abs=0.01), r  # FSDP's and the logits': exact
        for kind in ("params", "grads", "optimizer"):  # the shards the rank holds: exactly the plan's
            r = rows[f"{layout}: {kind} held per rank (rank 0)"]
            assert r["value"] > 0 and r["ratio"] == pytest.approx(1.0, abs=1e-6), r
    # the tokens exchanged depend on the routing; the estimate assumes balanced experts (Sinkhorn's aim)
    assert 0.8 <= rows["2 processes, ep 2: all-to-all per step (rank 0)"]["ratio"] <= 1.2
    for name, r in rows.items():
        if "tok/s" == r["unit"]:
            assert r["value"] > 0


@pytest.mark.parametrize("flags,msg", [(["--serve"], "choose one"), (["--data"], "choose one"), (["--nproc", "1"], "--nproc must be >= 2"),
                                       (["--device", "cuda"], "gloo")])
def test_distributed_bench_flags(flags, msg, capsys):
    assert main(["bench", "--distributed", *flags]) == 2
    assert msg in capsys.readouterr().err
