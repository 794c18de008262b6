"""``blackmamba info MODEL``: parameters (total / active), layer pattern, FLOPs per token, state size."""

from __future__ import annotations

import argparse

from ..config import describe, preset


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder, hub id (owner/name) or preset name (tiny, small, blackmamba-1.5b, ...)")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import read_config, resolve_path
    from ..config import PRESETS

    if args.model in PRESETS:
        cfg = preset(args.model)
        source = f"preset {args.model}"
    else:
        cfg, fmt = read_config(resolve_path(args.model))
        source = f"{args.model} ({fmt} format)"
    print(f"{source}\n{describe(cfg)}")
    return 0
