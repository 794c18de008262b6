"""A comparison's figures and ``report.md``, from its results.json content (``compare.run``).

Figures (in ``DIR/plots``): validation bits per byte against training FLOPs (the paper's loss-vs-compute figure),
decode latency per token against the context, prefill time against the length, the share of tokens each expert
received per MoE layer over training (heatmaps), and Sinkhorn's balance per iteration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import atomic_file
from ..train.plots import pyplot
from .latency import growth

FLAT = 1.15  # decode latency at the longest context / the shortest that counts as flat


def _loss_vs_flops(results: dict, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a in results["architectures"]:
        c = a["val_curve"]
        ax.plot([r["flops"] for r in c], [r["val_bpb"] for r in c], "o-", ms=3, label=a["name"])
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="validation bits per byte",
           title="validation loss against training compute")
    return _save(fig, ax, path)


def _save(fig, ax, path: Path) -> Path:
    """A grid and the legend on ``ax``, then ``fig`` written to ``path`` and closed."""
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def _latency(results: dict, key: str, ylabel: str, title: str, path: Path, logy: bool) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a in results["architectures"]:
        curve = a[key]
        xs = sorted(curve, key=int)
        ax.plot([int(x) for x in xs], [curve[x] for x in xs], "o-", label=a["name"])
    ax.set(xscale="log", xlabel="context (tokens)" if key.startswith("decode") else "prompt length (tokens)",
           ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_xticks([int(x) for x in results["contexts"]], [str(x) for x in results["contexts"]])
    return _save(fig, ax, path)


def _expert_usage(results: dict, path: Path) -> Path | None:
    """One heatmap per (architecture, MoE layer): experts × logged training windows, the share of the tokens."""
    panels = [(a["name"], layer, u) for a in results["architectures"] for layer, u in a.get("expert_usage", {}).items()]
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.2 + 1.5 * len(panels)), squeeze=False)
    for ax, (name, layer, u) in zip(axes[:, 0], panels):
        mat = np.asarray(u["fraction"], dtype=np.float64).T  # (experts, records)
        steps = u["steps"]
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0 / mat.shape[0], float(mat.max())),
                       extent=(steps[0], steps[-1], mat.shape[0] - 0.5, -0.5), interpolation="nearest")
        ax.set(ylabel="expert", title=f"{name}, layer {layer}: share of tokens per expert (uniform "
                                      f"{1 / mat.shape[0]:.1%})")
        fig.colorbar(im, ax=ax, fraction=0.03)
    axes[-1, 0].set_xlabel("training step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x < 1e3 else f"{x:.2e}"


def _table(results: dict) -> list[str]:
    archs = results["architectures"]
    measured = "val_bpb" in archs[0]
    head = ["architecture", "pattern", "params total", "params active", "train FLOPs", "tokens"]
    if measured:
        lo, hi = str(min(results["contexts"])), str(max(results["contexts"]))
        head += ["val bits/byte", "train s", f"decode ms/token @{lo}", f"@{hi}", "growth", f"prefill ms @{hi}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in archs:
        cells = [a["name"], a["pattern"], f"{a['params_total'] / 1e6:.2f}M", f"{a['params_active'] / 1e6:.3f}M",
                 _fmt(a["train_flops"]), f"{a['train_tokens'] / 1e6:.2f}M"]
        if measured:
            d = a["decode_ms_per_token"]
            cells += [f"{a['val_bpb']:.3f}", f"{a['train_seconds']:.0f}", f"{d[lo]:.3f}", f"{d[hi]:.3f}",
                      f"{a['decode_growth']:.2f}×", f"{a['prefill_ms'][hi]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def checks(results: dict) -> list[str]:
    """The measurable claims, each as a line saying what was measured and whether it holds here."""
    archs = {a["name"]: a for a in results["architectures"]}
    out = []
    for name in ("blackmamba", "mamba"):
        g = growth(archs[name]["decode_ms_per_token"])
        out.append(f"- {name}: decode latency at {max(results['contexts'])} tokens of context is {g:.2f}× that at "
                   f"{min(results['contexts'])} ({'flat' if g <= FLAT else 'NOT flat'}: the limit is {FLAT}×).")
    for name in ("transformer", "transformer-moe"):
        g = growth(archs[name]["decode_ms_per_token"])
        out.append(f"- {name}: decode latency grows {g:.2f}× over the same contexts (its KV cache).")
    best = min(archs.values(), key=lambda a: a["val_bpb"])
    bm = archs["blackmamba"]
    out.append(f"- lowest validation bits per byte: {best['name']} ({best['val_bpb']:.3f}); blackmamba "
               f"{bm['val_bpb']:.3f}, at {bm['train_flops'] / archs['transformer']['train_flops']:.2f}× the "
               f"transformer's training FLOPs and {bm['params_total'] / bm['params_active']:.1f}× its own active "
               f"parameters in total.")
    return out


def write_report(out: Path, results: dict, configs: dict[str, Path]) -> Path:
    """Write ``out/plots/*.png`` and ``out/report.md``; returns the report's path."""
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    lines = [f"# blackmamba compare: scale {results['scale']}", "", "```", results["command"], "```", "",
             "Each architecture is an ordinary run folder, trained with:", "", "```"]
    lines += [f"blackmamba train --out {out / name} --config {path}" for name, path in configs.items()]
    lines += ["```", ""]
    if results["scale"] == "paper":
        lines += [f"Not run here: `{results['launch']}` launches them with torchrun (docs/distributed.md).", ""]
    lines += ["## Results", ""] + _table(results) + [""]
    if "val_bpb" in results["architectures"][0]:
        figs = [("validation loss against training FLOPs", _loss_vs_flops(results, plots / "loss_vs_flops.png")),
                ("decode latency per token against the context",
                 _latency(results, "decode_ms_per_token", "ms per token (batch 1)", "decode latency",
                          plots / "decode_latency.png", logy=False)),
                ("prefill time against the prompt's length",
                 _latency(results, "prefill_ms", "ms (batch 1)", "prefill time", plots / "prefill.png", logy=True)),
                ("expert usage per MoE layer over training", _expert_usage(results, plots / "expert_usage.png"))]
        lines += ["## What holds at this scale", ""] + checks(results) + [""]
        lines += [f"Latency: batch 1, fp32, {results['torch_threads']} thread(s), the median of "
                  f"{results['latency_reps']} repetitions taken interleaved over the architectures.", ""]
        for title, path in figs:
            if path is not None:
                lines += [f"### {title}", "", f"![{title}](plots/{path.name})", ""]
        from .sinkhorn import plot_study, summarize

        lines += ["## Sinkhorn: iterations and the balance they reach", "", summarize(results["sinkhorn"]), "",
                  f"![Sinkhorn](plots/{plot_study(results['sinkhorn'], plots / 'sinkhorn.png').name})", ""]
    path = out / "report.md"
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return path
