"""What every benchmark section shares: timing, paired ratios, result rows with their targets, the table.

A result is a row: ``{"bench", "value", "unit", "baseline", "ratio", "ratio_quartiles", "target", "met"}`` — a
measurement, the baseline measured in the same run it is divided by, and the target that ratio is held to (if
any). ``blackmamba bench`` prints the rows as a table and ``--json`` writes ``{"device", "machine", "rows", ...}``.

On a shared machine the speed of everything drifts by tens of percent within seconds, so no ratio is taken
between separately measured bests: each workload alternates with its baseline (``paired_ratios``) and the median
of the per-pair ratios is reported, with their quartiles.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable


def best_time(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Fastest of ``reps`` wall-clock runs after ``warmup`` runs (the machine may be shared: the fastest
    run is the one least disturbed)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def row(rows: list, name: str, value: float, unit: str, baseline: str | None = None, ratio: float | None = None,
        target: tuple[str, float] | None = None, quick: bool = False,
        spread: tuple[float, float] | None = None) -> None:
    """Append one result. ``target``: ("min", x) — the ratio must reach x — or ("max", x), judged unless ``quick``;
    ``spread``: the quartiles of a ratio taken as the median of paired samples (``paired_ratios``)."""
    met = goal = None
    if target is not None:
        kind, threshold = target
        goal = f"{'≥' if kind == 'min' else '≤'} {threshold:g}"
        if ratio is not None and not quick:
            met = ratio >= threshold if kind == "min" else ratio <= threshold
    rows.append(dict(bench=name, value=value, unit=unit, baseline=baseline, ratio=ratio,
                     ratio_quartiles=list(spread) if spread is not None else None, target=goal, met=met))


def optional(module: str):
    """The module, or None where it is not installed (a baseline that is skipped)."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        return None


@dataclass
class Paired:
    """Per-pair time ratios t_a / t_b of two alternately timed workloads, and each one's fastest time."""
    ratios: list
    best_a: float
    best_b: float

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def quartiles(self) -> tuple[float, float]:
        """(first, third) quartile of the per-pair ratios: how far the machine's noise spreads them."""
        if len(self.ratios) < 2:
            return self.ratios[0], self.ratios[0]
        q = statistics.quantiles(self.ratios, n=4, method="inclusive")
        return q[0], q[2]

    def per(self, amount: float) -> tuple[float, tuple[float, float]]:
        """(amount / median ratio, its quartiles): a's rate relative to b's, for ``amount`` of a's work
        done per unit of b's (a time ratio's first quartile is the rate's third)."""
        lo, hi = self.quartiles()
        return amount / self.median, (amount / hi, amount / lo)


def paired_ratios(pairs: dict, reps: int, warm: bool = False) -> dict:
    """{key: Paired} for pairs {key: (fn_a, fn_b)}: ``reps`` rounds, each timing every pair once, a then b.

    The two workloads of a pair run back to back, so each ratio compares runs made under the same load:
    on a shared machine the speed of both drifts by tens of percent within seconds, and a ratio of two
    separately taken bests can land anywhere in that range. The rounds visit every pair in turn, so each
    pair's ratios are sampled across the whole measurement rather than in one stretch of a few seconds
    (the machine's slow and fast phases last that long, and they slow some workloads more than others);
    the median of the per-pair ratios is the reported value. ``warm``: run each workload once untimed
    right before its timed run, so that neither is timed on caches the other has just flushed (for
    workloads whose data fit in the caches).
    """
    for fn_a, fn_b in pairs.values():
        fn_a(), fn_b()
    warmup = 1 if warm else 0
    out = {key: Paired([], float("inf"), float("inf")) for key in pairs}
    for _ in range(max(1, reps)):
        for key, (fn_a, fn_b) in pairs.items():
            ta, tb = best_time(fn_a, 1, warmup=warmup), best_time(fn_b, 1, warmup=warmup)
            p = out[key]
            p.ratios.append(ta / tb)
            p.best_a, p.best_b = min(p.best_a, ta), min(p.best_b, tb)
    return out


def paired_ratio(fn_a: Callable[[], object], fn_b: Callable[[], object], reps: int, warm: bool = False) -> Paired:
    """``paired_ratios`` of one pair."""
    return paired_ratios({0: (fn_a, fn_b)}, reps, warm)[0]


def decode_bytes_per_token(model, batch_size: int = 1) -> int:
    """Bytes one decode step must read: the weights its tokens use (``model.weight_bytes``), plus reading and
    writing the recurrent state."""
    return model.weight_bytes(tokens=batch_size) + 2 * model.new_state(batch_size).nbytes()


def format_table(result: dict) -> str:
    head = f"{'benchmark':<66} {'value':>12}  {'baseline':<46} {'ratio':>8} {'quartiles':>11}  {'target':>7}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        quart = "{:.2f}-{:.2f}".format(*r["ratio_quartiles"]) if r.get("ratio_quartiles") else ""
        verdict = {True: " ok", False: " MISSED", None: ""}[r["met"]]
        lines.append(f"{r['bench']:<66} {r['value']:>8.4g} {r['unit']:<6} {r['baseline'] or '-':<46} {ratio:>8}"
                     f" {quart:>11}  {r['target'] or '':>7}{verdict}")
    for note in result.get("notes", []):
        lines.append(note)
    return "\n".join(lines)
