"""``blackmamba bench``: print a table of ratios against baselines measured in the same run; ``--json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: fused CPU kernels, decode, MoE (default); cuda: the Triton kernels on a GPU")
    p.add_argument("--quick", action="store_true", help="toy sizes, a few seconds (a smoke test: no targets judged)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH (cpu)")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads (default: torch's, usually all cores)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..cli import UserError

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        from .gpu import run_gpu_bench

        return run_gpu_bench(args)
    from .cpu import format_table, run_cpu_bench

    if args.json:
        out = Path(args.json)
        if out.is_dir():
            raise UserError(f"--json {out}: is a directory, give a file path")
        out.parent.mkdir(parents=True, exist_ok=True)
    result = run_cpu_bench(quick=args.quick)
    print(format_table(result))
    if args.json:
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0
