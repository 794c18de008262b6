"""End-of-run plots from ``metrics.jsonl``: loss and validation bits-per-byte curves, and a heatmap of
the share of tokens each expert received in every MoE layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: list[dict], path: Path, reference_bpb: float | None = None) -> Path:
    """Train/val loss (nats per token) and val bits per byte against the optimizer step."""
    plt = pyplot()
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "val"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax1.set(xlabel="step", ylabel="loss (nats / token)", title="loss")
    ax1.grid(alpha=0.3)
    ax1.legend()
    if val:
        ax2.plot([r["step"] for r in val], [r["val_bpb"] for r in val], "o-", color="C1", label="validation")
        last = val[-1]
        ax2.annotate(f"{last['val_bpb']:.3f}", (last["step"], last["val_bpb"]), textcoords="offset points",
                     xytext=(0, 8), ha="center")
    if reference_bpb is not None:
        ax2.axhline(reference_bpb, color="gray", ls="--", lw=1, label=f"bzip2 -9 ({reference_bpb:.2f})")
    ax2.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def expert_usage(records: list[dict]) -> tuple[list[int], np.ndarray]:
    """(MoE layer indices, (layers, experts) mean token fraction over every train record)."""
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for r in records:
        if r.get("type") != "train":
            continue
        for s in r.get("router", []):
            f = np.asarray(s["fraction"], dtype=np.float64)
            sums[s["layer"]] = sums.get(s["layer"], 0) + f
            counts[s["layer"]] = counts.get(s["layer"], 0) + 1
    layers = sorted(sums)
    if not layers:
        return [], np.zeros((0, 0))
    width = max(len(sums[i]) for i in layers)
    mat = np.full((len(layers), width), np.nan)
    for row, i in enumerate(layers):
        mat[row, :len(sums[i])] = sums[i] / counts[i]
    return layers, mat


def expert_usage_figure(records: list[dict]):
    """The heatmap of ``plot_expert_usage`` as a matplotlib Figure (None without router records); the caller
    closes it. Cells and colour bar both read as percentages of the layer's tokens."""
    layers, mat = expert_usage(records)
    if not layers:
        return None
    plt = pyplot()
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.7 * mat.shape[1]), 1.6 + 0.5 * len(layers)))
    im = ax.imshow(mat, cmap="viridis", aspect="auto", vmin=0)
    for r in range(mat.shape[0]):
        for c in range(mat.shape[1]):
            if not np.isnan(mat[r, c]):
                light = mat[r, c] > 0.6 * np.nanmax(mat)  # dark text on the bright cells
                ax.text(c, r, f"{mat[r, c]:.0%}", ha="center", va="center", color="k" if light else "w", fontsize=8)
    ax.set_xticks(range(mat.shape[1]))
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set(xlabel="expert", title=f"share of training tokens per expert (uniform: {1 / mat.shape[1]:.1%})")
    fig.colorbar(im, ax=ax, fraction=0.046, format=PercentFormatter(xmax=1), label="share of tokens")
    fig.tight_layout()
    return fig


def plot_expert_usage(records: list[dict], path: Path) -> Path | None:
    """Heatmap (MoE layer × expert) of the share of training tokens routed to each expert, averaged over
    the run (``expert_usage``), written to ``path``; None (and no file) without router records."""
    fig = expert_usage_figure(records)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return Path(path)
