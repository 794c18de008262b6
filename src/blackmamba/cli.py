"""The ``blackmamba`` command.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and ``run(args) -> int``;
this file only lists them. User mistakes (missing files, bad values) print one line, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# CPU tensors of 2 MB and more on transparent huge pages (as NumPy does by default). PyTorch reads this once,
# at its first allocation, so it is set here, before any subcommand imports torch (``import blackmamba`` does
# not). Measured on the main job: 7x fewer page faults, a third less system time (README, "Huge pages").
# THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# glibc's malloc (Linux), where PyTorch gets CPU memory: blocks under 32 MB come from the heap, and up to
# 256 MB of freed heap is kept for the next allocation instead of being handed back to the kernel. Left
# to its defaults, glibc returns freed memory early and maps it afresh, so a tensor of a few MB allocated
# in every step (a scan's output, an MoE layer's buffers) is faulted in again, page by page, on every
# call. Measured: a scan call with a 4 MB output, ~800 faults and 3.9 ms → none and 2.6 ms; the main job,
# a quarter to a third fewer page faults (README, "Memory"). Setting glibc's own malloc variables
# (GLIBC_TUNABLES with glibc.malloc.*, MALLOC_*_) leaves malloc as they say.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MALLOC_SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 256 << 20}


def tune_malloc(environ=os.environ, libc=None) -> bool:
    """Apply MALLOC_SETTINGS through glibc's mallopt; False where not glibc or the environment sets malloc."""
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in environ):
        return False
    if libc is None:
        if not sys.platform.startswith("linux"):
            return False
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:  # musl and others: their own malloc
            return False
    mallopt = getattr(libc, "mallopt", None)
    return mallopt is not None and all(mallopt(k, v) == 1 for k, v in MALLOC_SETTINGS.items())


tune_malloc()

# name → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("blackmamba.info", "print a model's parameters (total/active), layer pattern and FLOPs per token"),
    "train": ("blackmamba.train.command",
              "train a model on a text corpus (default: Shakespeare's complete works); --resume continues a run"),
    "generate": ("blackmamba.generate_cli", "continue prompts with a trained model, streaming the text"),
    "convert": ("blackmamba.convert", "convert a checkpoint between the native, release and transformers formats"),
    "eval": ("blackmamba.eval.command", "lm-evaluation-harness tasks, or perplexity / bits per byte of a text file"),
    "bench": ("blackmamba.bench.command", "benchmarks: ratios against baselines and machine limits measured in the same run"),
}


class UserError(Exception):
    """A mistake on the command line or in the inputs: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blackmamba", description="BlackMamba (Mamba + top-1 MoE) language models: "
                                     "train, generate, evaluate, convert and benchmark.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log backend choices and other details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data.corpus import DataError
    from .files import OutputError

    try:
        return int(args._run(args) or 0)
    except (UserError, CheckpointError, ConfigError, DataError, OutputError, FileNotFoundError) as e:
        msg = str(e).strip() or type(e).__name__
        print(f"blackmamba {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"blackmamba {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
