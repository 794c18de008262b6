"""End of a run: plots, a short text summary and a few sample generations (also saved to the run)."""

from __future__ import annotations

import bz2
from pathlib import Path

import numpy as np

from ..files import write_json
from ..generation.text import generate_text
from .metrics import read_metrics
from .plots import expert_usage, plot_curves, plot_expert_usage


def bzip2_bpb(text: str) -> float:
    """Bits per byte that ``bzip2 -9`` needs for ``text``: a reference point for the model's val_bpb."""
    data = text.encode()
    return len(bz2.compress(data, 9)) * 8 / max(len(data), 1)


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def run_expert_load(records: list[dict]) -> list[dict]:
    """Per MoE layer: each expert's share of the tokens over the whole run and max/mean load (1.0 =
    balanced), from ``plots.expert_usage``, the same averages the heatmap shows; the train records'
    own ``max_load`` describes only their logging window."""
    layers, mat = expert_usage(records)
    out = []
    for i, row in zip(layers, mat):
        row = row[~np.isnan(row)]
        mean = float(row.mean())
        out.append({"layer": i, "fraction": [round(float(f), 5) for f in row],
                    "max_load": round(float(row.max()) / mean, 4) if mean > 0 else 0.0})
    return out


def finish_run(run_dir: Path, trainer, result, model=None) -> str:
    """Write plots/, samples.txt and summary.json into the run directory; return the text summary. ``model``: the
    whole model that writes the samples (default ``trainer.model``; a sharded run's, read back, on rank 0)."""
    run_dir = Path(run_dir)
    cfg, model, tok = trainer.cfg, model or trainer.model, trainer.data.tokenizer
    records = read_metrics(run_dir / "metrics.jsonl")
    reference = bzip2_bpb(trainer.data.val_text())  # (the first million held-out tokens' text)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    made = [plot_curves(records, plots / "loss.png", reference), plot_expert_usage(records, plots / "experts.png")]
    total, active = model.config.param_counts()
    p = result.progress
    val = result.last_val or {}
    lines = [
        f"run {run_dir}: {p.step} steps, {p.tokens / 1e6:.2f}M tokens in {_duration(p.elapsed_s)} of training "
        f"({result.tokens_per_s:,.0f} tokens/s)",
        f"model: preset {cfg.preset}, {len(model.config.layers)} layers {''.join(model.config.layers)}, "
        f"hidden {model.config.hidden_size}, {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token), "
        f"vocab {model.config.vocab_size} ({model.config.padded_vocab_size} embedding rows)",
    ]
    if val:
        lines.append(f"validation ({val['val_bytes']:,} bytes held out): loss {val['val_loss']:.3f} nats/token, "
                     f"{val['val_bpb']:.3f} bits per byte (bzip2 -9 on the same text: {reference:.3f})")
    experts = run_expert_load(records)
    if experts:
        loads = ", ".join(f"layer {r['layer']} {r['max_load']:.2f}" for r in experts)
        lines.append(f"experts, share of tokens over the run (max/mean load, 1.00 = balanced): {loads}")
    lines.append("plots: " + ", ".join(str(m) for m in made if m is not None))
    samples = []
    prompts = [s for s in cfg.train.sample_prompts if s]
    if prompts and cfg.train.sample_tokens > 0:
        texts = generate_text(model, tok, prompts, cfg.train.sample_tokens, do_sample=True, temperature=0.8,
                              top_k=50, seed=cfg.train.seed)
        samples = [{"prompt": pr, "text": t} for pr, t in zip(prompts, texts)]
        (run_dir / "samples.txt").write_text("".join(f"--- {s['prompt']!r}\n{s['prompt']}{s['text']}\n\n"
                                                     for s in samples), encoding="utf-8")
    write_json(run_dir / "summary.json", {
        "steps": p.step, "tokens": p.tokens, "train_seconds": round(p.elapsed_s, 2),
        "tokens_per_s": round(result.tokens_per_s, 1), "final_train_loss": result.last_loss,
        "bzip2_bpb": round(reference, 4), **val,
        "parameters": total, "active_parameters": active, "expert_load": experts, "samples": samples})
    text = "\n".join(lines)
    if samples:
        text += "\n\nsamples (temperature 0.8, top-k 50):\n" + "\n".join(
            f"--- {s['prompt']!r}\n{s['prompt']}{s['text']}" for s in samples)
    return text
