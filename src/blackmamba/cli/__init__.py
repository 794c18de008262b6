"""The ``blackmamba`` command: one module per subcommand, each defining ``add_arguments(parser)`` and
``run(args) -> int``; this file lists them and turns user mistakes into one line and exit status 2.

The process settings (``process``) are applied in ``main``, before any subcommand imports torch; the subcommand
modules import torch and the package's heavy modules only inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("blackmamba.cli.info", "print a model's parameters (total/active), layer pattern and FLOPs per token; "
             "with --world-size, the memory and traffic per rank of training it on N ranks"),
    "train": ("blackmamba.cli.train",
              "train a model on a text corpus (default: Shakespeare's complete works); --resume continues a run; "
              "under torchrun, on every process"),
    "data": ("blackmamba.cli.data", "prepare a corpus (tokenize it into the cache, as train would) or inspect one"),
    "generate": ("blackmamba.cli.generate", "continue prompts with a trained model, streaming the text"),
    "serve": ("blackmamba.cli.serve", "an OpenAI-compatible HTTP server with continuous batching and a prefix cache"),
    "convert": ("blackmamba.cli.convert", "convert a checkpoint between the native, release and transformers formats"),
    "eval": ("blackmamba.cli.eval", "lm-evaluation-harness tasks, or perplexity / bits per byte of a text file"),
    "compare": ("blackmamba.cli.compare",
                "the paper's comparison: BlackMamba vs dense Mamba vs transformer vs transformer-MoE at matched "
                "active parameters, trained alike, then measured (loss vs FLOPs, latency, Sinkhorn, experts)"),
    "bench": ("blackmamba.cli.bench",
              "benchmarks: ratios against baselines and machine limits measured in the same run"),
}


def add_quantize_option(p: argparse.ArgumentParser) -> None:
    """``--quantize int8|int4`` (and ``--group-size``): load the model with its linear layers' weights quantized
    (``blackmamba.quantize``); a quantized checkpoint loads as it is."""
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help="quantize the linear layers' weights after loading: int8 (a scale per output row) or int4 "
                        "(a scale per --group-size inputs): those weights in about 1/2 or 1/3.5 of bfloat16's bytes, "
                        "decoded faster on CPU (measured: docs/quantization.md)")
    p.add_argument("--group-size", type=int, default=32, choices=(32, 64), help="int4: inputs per scale (32)")


class UserError(Exception):
    """A mistake on the command line or in the inputs: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blackmamba", description="BlackMamba (Mamba + top-1 MoE) language models: "
                                     "train, generate, serve, evaluate, convert and benchmark.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log backend choices and other details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that report a user's mistake (each a ValueError naming it), not a defect of the program."""
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..data.corpus import DataError
    from ..files import OutputError
    from ..generation.sampling import OptionError

    return (UserError, CheckpointError, ConfigError, DataError, OptionError, OutputError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    from .process import prepare

    prepare()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args._run(args) or 0)
    except user_errors() as e:
        msg = str(e).strip() or type(e).__name__
        print(f"blackmamba {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"blackmamba {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
