"""``blackmamba convert SRC DST --to {native,release,hf}``: between checkpoint formats, losslessly
(``checkpoint.convert``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint.convert import DTYPES, FORMATS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint folder (native, release or transformers format) or hub id")
    p.add_argument("dst", type=Path, help="new folder to write")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("--dtype", choices=DTYPES, help="cast floating-point weights (default: keep each tensor's dtype)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="native / hf: split the safetensors file above this size (default 5GB)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint.convert import convert, parse_size
    from . import UserError

    try:
        max_shard = parse_size(args.max_shard_size)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        fmt = convert(args.src, args.dst, args.to, dtype=dtype, max_shard_bytes=max_shard)
    except ValueError as e:
        raise UserError(str(e)) from None
    files = sorted(p.name for p in args.dst.iterdir())
    size = sum(p.stat().st_size for p in args.dst.iterdir())
    print(f"{args.src} ({fmt} format) → {args.dst} ({args.to} format): {', '.join(files)} ({size / 1e6:,.1f} MB)")
    return 0
