"""How many Sinkhorn iterations routing needs, and what each stop rule stops at.

The paper reports that its Sinkhorn variant converges in one iteration instead of 10-20. This study runs both
variants (``ops.sinkhorn``) on router logits (real layers' or synthetic ones) and records, per iteration, the
release's stop quantity (mean |Δd1|) and the plan's balance (``balance_metrics``: max/mean expert load of the
argmax routing, relative row and column marginal errors), and where each stop rule fires:

- ``delta`` (the release's, mean |Δd1| < 1e-4): an absolute test on d1, whose scale the BlackMamba
  initialisation makes ~ 1 / (E Σ_t exp(2L)), so it fires at iteration 1 whatever the marginals;
- ``marginal`` (max_t |T row_t - 1| < ``MARGINAL_TOL``): the plan really has the prescribed marginals.

``study`` gathers it all as JSON-ready data, ``plot_study`` draws it, ``summarize`` tabulates it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..ops.sinkhorn import DELTA_TOL, MARGINAL_TOL, STOP_RULES, VARIANTS, balance_metrics, sinkhorn, sinkhorn_iterates

MAX_ITERS = 1000  # the release's cap: a rule that has not fired by then stops here
TOLS = {"delta": DELTA_TOL, "marginal": MARGINAL_TOL}


def _number(x: float) -> float | None:
    """A JSON-safe float (None for inf / nan)."""
    return float(x) if math.isfinite(x) else None


def synthetic_logits(tokens: int, experts: int, temperature: float = 1.0, seed: int = 0,
                     skew: float = 0.0) -> torch.Tensor:
    """(tokens, experts) fp32 router logits: temperature * N(0, 1), plus ``skew`` * linspace(0, 1, experts), a
    per-expert bias that makes the last experts preferred (real routers are skewed; plain argmax is not balanced)."""
    g = torch.Generator().manual_seed(seed)
    return temperature * torch.randn(tokens, experts, generator=g) + skew * torch.linspace(0, 1, experts)


def trace(logits: torch.Tensor, variant: str, iters: int = 50) -> list[dict]:
    """logits (T, E) → one dict per iteration k = 0..iters (0: the initial scaling, before any update):
    ``iteration``, ``delta`` (mean |Δd1| of that update; None at 0) and ``balance_metrics`` of the plan."""
    out = []
    for it in sinkhorn_iterates(logits, variant):
        out.append({"iteration": it.iteration, "delta": _number(it.delta), **balance_metrics(it)})
        if it.iteration >= iters:
            break
    return out


def iterations_to_stop(logits: torch.Tensor, variant: str, max_iters: int = MAX_ITERS) -> dict:
    """logits (T, E) → per stop rule: {``iterations``, ``fired`` (before ``max_iters``), and ``balance_metrics``
    of the plan ``sinkhorn`` returns}, each rule at its default tolerance (``TOLS``)."""
    out = {}
    for rule in STOP_RULES:
        plan, n = sinkhorn(logits, variant, stop=rule, max_iters=max_iters)
        out[rule] = {"iterations": n, "fired": n < max_iters, **balance_metrics(plan)}
    return out


def _case(logits: torch.Tensor, iters: int, **info) -> dict:
    logits = logits.detach().float().reshape(-1, logits.shape[-1])  # (T, E)
    T, E = logits.shape
    top1 = torch.bincount(logits.argmax(1), minlength=E).max().item() * E / T
    variants = {}
    for v in VARIANTS:
        rows = trace(logits, v, iters)
        variants[v] = {"stop": iterations_to_stop(logits, v),
                       "curves": {key: [r[key] for r in rows]
                                  for key in ("iteration", "delta", "max_load", "row_err", "col_err")}}
    return {**info, "tokens": T, "experts": E, "top1_max_load": top1, "variants": variants}


def study(real: dict[str, torch.Tensor] | None = None, tokens: int = 4096, experts: int = 8,
          temperatures: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0), seed: int = 0, skew: float | None = 2.0,
          iters: int = 50) -> dict:
    """The study as JSON-ready data. Cases: each ``real`` layer's router logits (..., E) as given, synthetic
    Gaussian logits (tokens, experts) at each temperature, and (``skew`` not None) a skewed case at temperature 1.
    Per case: ``top1_max_load`` (plain argmax, no Sinkhorn: the reference) and per variant ``stop`` (per rule:
    iterations, fired, max_load / row_err / col_err there) and ``curves`` (iteration 0..iters: delta, max_load,
    row_err, col_err)."""
    cases = {}
    for name, logits in (real or {}).items():
        cases[name] = _case(logits, iters, source="real")
    for t in temperatures:
        cases[f"gaussian t={t:g}"] = _case(synthetic_logits(tokens, experts, t, seed), iters, source="synthetic",
                                           temperature=t, skew=0.0)
    if skew is not None:
        cases[f"skewed t=1 bias 0..{skew:g}"] = _case(synthetic_logits(tokens, experts, 1.0, seed, skew), iters,
                                                      source="synthetic", temperature=1.0, skew=skew)
    return {"iters": iters, "max_iters": MAX_ITERS, "seed": seed, "tols": dict(TOLS), "cases": cases}


def plot_study(result: dict, path: Path) -> Path:
    """Two panels against the iteration: max/mean expert load of the argmax routing, and the row-marginal error
    max_t |T row_t - 1| (log scale, from iteration 1). One colour per case, solid = blackmamba, dashed = vanilla;
    o marks where the delta rule stops, * where the marginal rule does (when within the plotted iterations)."""
    from matplotlib.lines import Line2D

    from ..train.plots import pyplot

    plt = pyplot()
    styles = {"blackmamba": "-", "vanilla": "--"}
    marks = {"delta": "o", "marginal": "*"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    handles = []
    for i, (name, case) in enumerate(result["cases"].items()):
        color = f"C{i % 10}"
        handles.append(Line2D([], [], color=color, label=f"{name} (top-1 {case['top1_max_load']:.2f})"))
        for v, run in case["variants"].items():
            c = run["curves"]
            ax1.plot(c["iteration"], c["max_load"], styles[v], color=color, lw=1.2)
            ax2.plot(c["iteration"][1:], c["row_err"][1:], styles[v], color=color, lw=1.2)
            for rule, s in run["stop"].items():
                k = s["iterations"]
                if k < len(c["iteration"]):
                    ax1.plot(k, c["max_load"][k], marks[rule], color=color, ms=7, mfc="none")
                    if k >= 1:
                        ax2.plot(k, c["row_err"][k], marks[rule], color=color, ms=7, mfc="none")
    ax2.axhline(result["tols"]["marginal"], color="gray", lw=1, ls=":")
    ax1.set(xlabel="iteration (0 = initial scaling)", ylabel="max / mean tokens per expert",
            title="argmax load (1.00 = balanced)")
    ax2.set(xlabel="iteration", ylabel="max_t |T row_t - 1|", yscale="log",
            title=f"row-marginal error (dotted: marginal tol {result['tols']['marginal']:g})")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    handles += [Line2D([], [], color="k", ls=ls, label=v) for v, ls in styles.items()]
    handles += [Line2D([], [], color="k", ls="", marker=m, mfc="none", label=f"{rule} rule stops")
                for rule, m in marks.items()]
    ax2.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def summarize(result: dict) -> str:
    """A markdown table: per case and variant, the iterations each rule takes (``≥N cap`` when it never fired)
    and the max/mean load and row-marginal error of the plan it stops at."""
    tols = result["tols"]
    lines = [f"Sinkhorn stop rules: delta = mean |Δd1| < {tols['delta']:g} (the release); "
             f"marginal = max_t |T row_t - 1| < {tols['marginal']:g}. Load = max/mean tokens per expert.", "",
             "| case | top-1 load | variant | delta: iters | load | row err | marginal: iters | load | row err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, case in result["cases"].items():
        for v, run in case["variants"].items():
            cells = []
            for rule in STOP_RULES:
                s = run["stop"][rule]
                n = str(s["iterations"]) if s["fired"] else f"≥{s['iterations']} cap"
                cells += [n, f"{s['max_load']:.3f}", f"{s['row_err']:.1e}"]
            lines.append(f"| {name} | {case['top1_max_load']:.3f} | {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
