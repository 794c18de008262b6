"""``blackmamba info MODEL --world-size N ...``: the training plan after the model's description; an impossible
layout is one line and exit status 2."""

import subprocess
import sys

from support.env import checkout_env

from blackmamba.cli import main


def test_info_prints_the_plan_and_refuses_an_impossible_layout():
    r = subprocess.run([sys.executable, "-m", "blackmamba", "info", "tiny", "--world-size", "2", "--ep", "2",
                        "--batch", "4", "--seq", "32"], capture_output=True, text=True, env=checkout_env())
    assert r.returncode == 0, r.stderr
    assert "parameters      77,640 total" in r.stdout  # the model first, as without the flags
    assert "plan            2 ranks (ep 2: a 1 × 2 mesh)" in r.stdout
    for row in ("parameters (fp32 shards)", "gathered units", "all-to-all (expert tokens)",
                "all-gather (Sinkhorn logits)"):
        assert f"  {row}" in r.stdout
    r = subprocess.run([sys.executable, "-m", "blackmamba", "info", "tiny", "--world-size", "2", "--ep", "3",
                        "--batch", "4", "--seq", "32"], capture_output=True, text=True, env=checkout_env())
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "ep = 3 does not divide world_size = 2" in r.stderr


def test_plan_flags_need_the_world_size(capsys):
    assert main(["info", "tiny", "--ep", "2", "--batch", "4"]) == 2
    assert "--ep, --batch describe a parallel run: give --world-size N too" in capsys.readouterr().err
    assert main(["info", "tiny", "--world-size", "2", "--seq", "8"]) == 2
    assert "--world-size needs --batch" in capsys.readouterr().err
    assert main(["info", "tiny"]) == 0
    assert "plan" not in capsys.readouterr().out
