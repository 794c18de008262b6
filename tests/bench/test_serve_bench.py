"""``blackmamba bench --serve``: the serving benchmark end to end at toy sizes, in process (its JSON and table) and
against a running server through HTTP; its flags are checked before anything runs."""

import json

import pytest
from support.serving import Server, write_model_folder

from blackmamba.bench.serve import run_serve_bench
from blackmamba.cli import main

ROWS = ["serve: 16 concurrent greedy requests, tokens/s"] + [
    f"serve: concurrency {c}, {what}" for c in (1, 4, 16, 64)
    for what in ("throughput", "time to first token (median)", "inter-token latency (median)")]


def check(result):
    names = [r["bench"] for r in result["rows"]]
    assert names[:len(ROWS)] == ROWS and names[-1].startswith("serve: TTFT, prompt extending a cached")
    assert result["identical_texts"] is True  # batch invariance: concurrent texts equal the sequential ones
    for r in result["rows"]:
        assert r["value"] > 0 and r["ratio"] > 0 and r["met"] is None  # quick: no target judged


def test_quick_serve_bench_in_process(tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert main(["bench", "--serve", "--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    check(result)
    assert "16 concurrent greedy requests" in capsys.readouterr().out


def test_quick_serve_bench_against_a_server(tmp_path):
    srv = Server(write_model_folder(tmp_path / "model"), "--max-batch", "16")
    try:
        check(run_serve_bench(url=srv.url, quick=True, log=lambda _: None))
    finally:
        code, out = srv.stop()
    assert code == 0, out


@pytest.mark.parametrize("flags,expected", [(["--model", "x"], "--model is for --serve"),
                                            (["--serve", "--model", "x", "--url", "http://h/v1"], "give one")])
def test_serve_bench_flag_mistakes(capsys, flags, expected):
    assert main(["bench", *flags]) == 2
    assert expected in capsys.readouterr().err
