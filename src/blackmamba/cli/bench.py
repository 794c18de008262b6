"""``blackmamba bench``: print a table of ratios against baselines measured in the same run; ``--json``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: fused CPU kernels, decode, MoE (default); cuda: the Triton kernels on a GPU")
    p.add_argument("--quick", action="store_true", help="toy sizes, a few seconds (a smoke test: no targets judged)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads (default: torch's, usually all cores)")
    p.add_argument("--serve", action="store_true",
                   help="the serving benchmark instead: concurrent vs sequential requests, concurrency 1-64, "
                        "a cached prefix vs a new one (blackmamba.bench.serve)")
    p.add_argument("--distributed", action="store_true",
                   help="the distributed-training benchmark instead: one process vs --nproc processes (torchrun, "
                        "gloo) on the same global batch, and the bytes each rank moves vs info --world-size's "
                        "estimate (blackmamba.bench.distributed)")
    p.add_argument("--nproc", type=int, default=2, metavar="N", help="with --distributed: processes (default 2)")
    p.add_argument("--data", action="store_true",
                   help="the data benchmark instead: preparing a 300 MB JSONL corpus vs the tokenizers library's "
                        "batch encoder alone, and its peak memory (blackmamba.bench.data)")
    p.add_argument("--quantize", action="store_true",
                   help="the quantization benchmark instead: int8 / int4 decode against bfloat16 and the "
                        "bandwidth roofline, accuracy against float32 on --model's held-out text, the memory of a "
                        "loaded int4 1.5B-shaped model (blackmamba.bench.quant)")
    p.add_argument("--model", help="with --serve: the model to serve (run folder, model folder or hub id; default: "
                                   "the small preset with random weights); with --quantize: the run folder whose "
                                   "held-out text the accuracy is measured on")
    p.add_argument("--url", help="with --serve: load a running server instead (e.g. http://127.0.0.1:8000/v1)")
    p.add_argument("--api-key", help="with --url: the server's key")


def run(args: argparse.Namespace) -> int:
    import torch

    from . import UserError

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.json:
        out = Path(args.json)
        if out.is_dir():
            raise UserError(f"--json {out}: is a directory, give a file path")
        out.parent.mkdir(parents=True, exist_ok=True)
    from ..bench.harness import format_table

    if args.model is not None and not (args.serve or args.quantize):
        raise UserError("--model is for --serve and --quantize (the other benchmarks build their own models)")
    for flag in ("url", "api_key"):
        if getattr(args, flag) is not None and not args.serve:
            raise UserError(f"--{flag.replace('_', '-')} is for --serve (the other benchmarks build their own models)")
    if args.api_key is not None and args.url is None:
        raise UserError("--api-key is for --url (a running server's key)")
    if args.url is not None and args.model is not None:
        raise UserError("--model and --url: give one (--url loads a server that already has its model)")
    if sum((args.serve, args.distributed, args.data, args.quantize)) > 1:
        raise UserError("--serve, --distributed, --data and --quantize are different benchmarks: choose one")
    if args.quantize and args.device != "cpu":
        raise UserError("--quantize measures the CPU kernels (--device cpu)")
    if args.distributed and args.device != "cpu":
        raise UserError("--distributed measures CPU processes on gloo (--device cpu)")
    if args.nproc < 2:
        raise UserError(f"--nproc must be >= 2, got {args.nproc}")
    try:
        if args.quantize:
            from ..bench.quant import run_quant_bench

            result = run_quant_bench(args.model, quick=args.quick)
        elif args.data:
            from ..bench.data import run_data_bench

            result = run_data_bench(quick=args.quick)
        elif args.distributed:
            from ..bench.distributed import run_distributed_bench

            result = run_distributed_bench(args.nproc, quick=args.quick)
        elif args.serve:
            from ..bench.serve import run_serve_bench

            result = run_serve_bench(args.model, device=args.device, quick=args.quick, url=args.url,
                                     api_key=args.api_key)
        elif args.device == "cuda":
            from ..bench.gpu import run_gpu_bench

            result = run_gpu_bench(quick=args.quick)
        else:
            from ..bench.cpu import run_cpu_bench

            result = run_cpu_bench(quick=args.quick)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(format_table(result))
    if args.json:
        from ..files import write_json

        write_json(out, result)
        print(f"wrote {out}")
    return 0
