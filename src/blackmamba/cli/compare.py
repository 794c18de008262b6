"""``blackmamba compare --out DIR``: BlackMamba against dense Mamba, a transformer and a transformer-MoE at matched
active parameters per token, trained on the same data with the same schedule, then measured (validation bits per
byte against training FLOPs, decode and prefill latency, Sinkhorn, expert usage) into DIR/results.json and
DIR/report.md (``compare.run``)."""

from __future__ import annotations

import argparse


def _contexts(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected token counts separated by commas, e.g. "
                                         f"128,512,2048,8192") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..compare.archs import SCALES

    p.add_argument("--out", required=True, metavar="DIR", help="comparison folder: one run folder per architecture, "
                   "results.json, report.md, plots/ (a re-run skips the finished runs and resumes the others)")
    p.add_argument("--scale", default="small", choices=list(SCALES),
                   help="tiny: a few minutes on 2 CPU cores; small (default): the main job's model, about 15 "
                        "minutes; paper: the paper's 340M-active models, configurations and a torchrun script for a "
                        "GPU cluster, not run here")
    p.add_argument("--data", nargs="+", metavar="PATH", help="train on these instead of the embedded Shakespeare "
                   "corpus (as blackmamba train --data)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of every architecture's run, e.g. --set optim.lr=1e-3, "
                        "--set model.hidden_size=256 (the other architectures are matched to BlackMamba's)")
    p.add_argument("--steps", type=int, help="optimizer steps of every run (default: the scale's)")
    p.add_argument("--contexts", type=_contexts, metavar="N,N,...",
                   help="contexts (and prompt lengths) of the latency measurement (default: 128,512,2048,8192)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions of the latency measurement")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (plain progress lines)")


def run(args: argparse.Namespace) -> int:
    import sys

    from ..compare.run import TrainingFailed, compare

    try:
        compare(args.out, scale=args.scale, data=args.data, assignments=args.set, steps=args.steps,
                contexts=args.contexts, reps=args.reps, progress=not args.no_progress and sys.stderr.isatty())
    except TrainingFailed as e:
        print(f"blackmamba compare: {e}", file=sys.stderr)
        return 1
    return 0
