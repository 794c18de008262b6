"""``blackmamba convert SRC DST --to {native,release,hf}``: between checkpoint formats, losslessly; ``--quantize
int8|int4`` writes a quantized native checkpoint (``checkpoint.convert``, ``blackmamba.quantize``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint.convert import DTYPES, FORMATS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint folder (native, release or transformers format) or hub id")
    p.add_argument("dst", type=Path, help="new folder to write")
    p.add_argument("--to", default="native", choices=FORMATS, help="output format (default native)")
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help="quantize the linear layers' weights (int8: a scale per output row; int4: a scale per "
                        "--group-size inputs): a native checkpoint that loads back without re-quantizing")
    p.add_argument("--group-size", type=int, default=32, choices=(32, 64), help="int4: inputs per scale (32)")
    p.add_argument("--quantize-embedding", action="store_true",
                   help="with --quantize: the embedding table too (a tied LM head then reads it)")
    p.add_argument("--dtype", choices=DTYPES, help="cast floating-point weights (default: keep each tensor's dtype)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="native / hf: split the safetensors file above this size (default 5GB)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint.convert import convert, parse_size
    from . import UserError

    if args.quantize_embedding and not args.quantize:
        raise UserError("--quantize-embedding goes with --quantize int8|int4")
    try:
        max_shard = parse_size(args.max_shard_size)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        fmt = convert(args.src, args.dst, args.to, dtype=dtype, max_shard_bytes=max_shard, quantize=args.quantize,
                      group_size=args.group_size, quantize_embedding=args.quantize_embedding)
    except ValueError as e:
        raise UserError(str(e)) from None
    files = sorted(p.name for p in args.dst.iterdir())
    size = sum(p.stat().st_size for p in args.dst.iterdir())
    what = f"{args.to} format" + (f", {args.quantize} quantized" if args.quantize else "")
    print(f"{args.src} ({fmt} format) → {args.dst} ({what}): {', '.join(files)} ({size / 1e6:,.1f} MB)")
    return 0
