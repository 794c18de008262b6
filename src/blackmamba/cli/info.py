"""``blackmamba info MODEL``: parameters (total / active), layer pattern, state size, and a table of FLOPs per token
of each layer kind (forward and training on ``--context N``-token windows, a decode step after N tokens; default N:
the model's max_seq_len); with ``--world-size N --batch B --seq L`` also the plan of training it on N ranks
(``blackmamba.parallel.plan``): memory per rank and the bytes each rank moves per optimizer step."""

from __future__ import annotations

import argparse

from ..config import ConfigError, describe, preset

# the flags that describe a parallel run; every one but --world-size needs --world-size
_PLAN_FLAGS = {"ep": "--ep", "batch": "--batch", "seq": "--seq", "grad_accum": "--grad-accum", "dtype": "--dtype",
               "activation_checkpointing": "--activation-checkpointing"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder, hub id (owner/name) or preset name (tiny, small, blackmamba-1.5b, ...)")
    p.add_argument("--context", type=int, metavar="N", help="tokens per training window and before the decode step "
                   "in the FLOPs table (default: the model's max_seq_len)")
    g = p.add_argument_group("training plan", "estimate memory per rank and communication per optimizer step of "
                             "training on N ranks (FSDP2 over all of them, expert parallelism over --ep)")
    g.add_argument("--world-size", type=int, metavar="N", help="ranks (GPUs or processes) in all")
    g.add_argument("--ep", type=int, metavar="E", help="expert-parallel size: divides N and every MoE layer's "
                   "experts (default 1)")
    g.add_argument("--batch", type=int, metavar="B", help="windows per global micro-batch, a multiple of N "
                   "(B / N per rank)")
    g.add_argument("--seq", type=int, metavar="L", help="tokens per window")
    g.add_argument("--grad-accum", type=int, metavar="A", help="micro-batches per optimizer step (default 1)")
    g.add_argument("--dtype", choices=("fp32", "bf16"), help="activation precision (bf16: autocast, the default; "
                   "the weights, gradients and collectives of parameters stay fp32)")
    g.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute each block in the backward")


def _plan(cfg, args: argparse.Namespace):
    """The plan the flags ask for, or None without --world-size; ConfigError for a flag without it."""
    from ..config import ConfigError

    given = [flag for name, flag in _PLAN_FLAGS.items() if getattr(args, name, None) is not None]
    if args.world_size is None:
        if given:
            raise ConfigError(f"{', '.join(given)} describe{'s' if len(given) == 1 else ''} a parallel run: "
                              f"give --world-size N too")
        return None
    missing = [flag for flag, value in (("--batch", args.batch), ("--seq", args.seq)) if value is None]
    if missing:
        raise ConfigError(f"--world-size needs {' and '.join(missing)} (windows per global micro-batch, tokens per "
                          f"window)")
    from ..parallel.plan import plan_training

    return plan_training(cfg, world_size=args.world_size, ep=1 if args.ep is None else args.ep, batch=args.batch,
                         seq=args.seq, grad_accum=1 if args.grad_accum is None else args.grad_accum,
                         dtype=args.dtype or "bf16", activation_checkpointing=bool(args.activation_checkpointing))


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import read_config, resolve_path
    from ..config import PRESETS

    if args.context is not None and args.context < 1:
        raise ConfigError(f"--context {args.context}: must be a positive integer (tokens)")
    if args.model in PRESETS:
        cfg = preset(args.model)
        source = f"preset {args.model}"
    else:
        cfg, fmt = read_config(resolve_path(args.model))
        source = f"{args.model} ({fmt} format)"
    plan = _plan(cfg, args)  # the flags are checked before anything is printed
    print(f"{source}\n{describe(cfg, args.context)}")
    if plan is not None:
        from ..parallel.plan import describe_plan

        print(describe_plan(plan))
    return 0
