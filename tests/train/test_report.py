"""The trainer's reporting: plain progress lines when there is no progress bar, the end-of-run expert
load taken from the same run-wide averages as the heatmap, and the heatmap's colour bar in percent."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from support.text import corpus_dir, isolated_cache, one_thread  # noqa: F401  (fixtures)

from blackmamba.ops import registry
from blackmamba.train.checkpoints import Progress
from blackmamba.train.config import build_config
from blackmamba.train.plots import expert_usage, expert_usage_figure, plot_expert_usage
from blackmamba.train.report import finish_run
from blackmamba.train.trainer import RunResult, Trainer

TINY = ["data.vocab_size=300", "data.seq_len=32", "optim.batch_size=4", "optim.warmup_steps=1",
        "train.steps=4", "train.device=cpu", "train.sample_tokens=0"]
PROGRESS = re.compile(r"^step (\d+)/4 \((\d+)%\)  loss \d+\.\d{3}  [\d,]+ tok/s  elapsed [\dhms]+(  eta [\dhms]+)?$")


@pytest.fixture
def reference_ops():
    """Plain PyTorch ops: the fused CPU kernels would first compile into this test's own cache (20-40 s)."""
    registry.set_backend("reference")
    yield
    registry.set_backend(None)


def test_without_a_bar_progress_lines_reach_log_at_the_interval(tmp_path, corpus_dir, reference_ops):
    from blackmamba.data.corpus import load_corpus

    from blackmamba.data.prepare import prepare_data

    data = prepare_data(load_corpus([corpus_dir], 0.1), vocab_size=300)

    def progress_lines(name, **kw):
        logged = []
        (tmp_path / name).mkdir()
        Trainer(tmp_path / name, build_config("tiny", None, TINY), data, log=logged.append, **kw).run()
        return [m for m in logged if PROGRESS.match(m)], logged

    lines, logged = progress_lines("every", progress_bar=False, progress_every_s=0)
    assert [PROGRESS.match(m).groups()[:2] for m in lines] == [("1", "25"), ("2", "50"), ("3", "75"), ("4", "100")]
    assert [bool(PROGRESS.match(m).group(3)) for m in lines] == [False, True, True, True]  # no eta from step 1 alone
    assert any("val loss" in m for m in logged)  # the validation line still goes to log too
    lines, _ = progress_lines("rare", progress_bar=False, progress_every_s=1e9)
    assert [PROGRESS.match(m).group(1) for m in lines] == ["1"]  # the first step, then not before the interval
    lines, logged = progress_lines("bar", progress_bar=True, progress_every_s=0)
    assert lines == [] and not any(m.startswith("step ") for m in logged)  # the bar shows progress instead


def _router(fractions: list[list[float]]) -> list[dict]:
    return [{"layer": layer, "fraction": f, "max_load": round(max(f) * len(f), 4), "sinkhorn_iters": 1.0}
            for layer, f in zip((1, 3), fractions)]


# three logging windows; the last one is far more balanced than the run as a whole
RECORDS = [
    {"type": "train", "step": 10, "loss": 3.0, "router": _router([[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]])},
    {"type": "train", "step": 20, "loss": 2.5, "router": _router([[0.5, 0.3, 0.1, 0.1], [0.4, 0.2, 0.2, 0.2]])},
    {"type": "val", "step": 20, "val_loss": 2.4, "val_bpb": 3.0, "val_tokens": 10, "val_bytes": 30},
    {"type": "train", "step": 30, "loss": 2.0, "router": _router([[0.25, 0.25, 0.25, 0.25], [0.3, 0.3, 0.2, 0.2]])},
]


def test_summary_expert_load_is_the_heatmaps_run_average(tmp_path):
    from blackmamba.model import BlackMambaLM

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = build_config("tiny", None, ["train.sample_tokens=0"])
    data = SimpleNamespace(tokenizer=None, val_text=lambda: "ROMEO.\nGood night.\n")
    trainer = SimpleNamespace(cfg=cfg, model=BlackMambaLM(cfg.model_config(300)), data=data)
    result = RunResult(Progress(step=30, samples=120, tokens=3840, elapsed_s=3.0), None, 2.0, 1280.0)
    text = finish_run(run, trainer, result)

    layers, mat = expert_usage(RECORDS)  # what plots/experts.png shows
    heatmap_load = mat.max(axis=1) / mat.mean(axis=1)
    assert layers == [1, 3] and heatmap_load == pytest.approx([1.45 / 0.75, 1.1 / 0.75])
    last_window = [r["max_load"] for r in RECORDS[-1]["router"]]
    assert last_window == pytest.approx([1.0, 1.2])  # layer 1's last window tells another story
    line, = [x for x in text.splitlines() if x.startswith("experts")]
    assert line == "experts, share of tokens over the run (max/mean load, 1.00 = balanced): layer 1 1.93, layer 3 1.47"
    summary = json.loads((run / "summary.json").read_text())
    assert [e["layer"] for e in summary["expert_load"]] == layers
    assert [e["max_load"] for e in summary["expert_load"]] == pytest.approx(heatmap_load, abs=1e-4)
    assert np.array([e["fraction"] for e in summary["expert_load"]]) == pytest.approx(mat, abs=1e-5)
    assert (run / "plots" / "experts.png").is_file()


def test_heatmap_colour_bar_is_labelled_in_percent(tmp_path):
    from matplotlib.ticker import PercentFormatter

    assert plot_expert_usage(RECORDS, tmp_path / "experts.png") == tmp_path / "experts.png"
    assert (tmp_path / "experts.png").stat().st_size > 0
    fig = expert_usage_figure(RECORDS)
    try:
        bar = fig.axes[0].images[0].colorbar
        assert bar.ax.get_ylabel() == "share of tokens"
        assert isinstance(bar.formatter, PercentFormatter)
        fig.canvas.draw()
        ticks = [t.get_text() for t in bar.ax.get_yticklabels() if t.get_text()]
        assert ticks and all(t.endswith("%") for t in ticks), ticks
        assert "10%" in ticks or "10.0%" in ticks, ticks  # a fraction of 0.1 reads as ten percent
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    assert expert_usage_figure([r for r in RECORDS if r["type"] == "val"]) is None
