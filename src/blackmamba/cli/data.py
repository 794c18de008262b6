"""``blackmamba data prepare`` / ``data inspect``: tokenize a corpus ahead of training, and show what a prepared
one holds (``blackmamba.data.prepare``).

    blackmamba data prepare --data web/*.jsonl.gz books/ [--config run.toml] [--set data.vocab_size=8192]
    blackmamba data inspect ~/.cache/blackmamba/tokens/<key>

``prepare`` reads the same settings as ``train`` (``[data]`` and ``[[data.mixture]]`` of ``--config``, ``--data``,
``--set data.*``, ``--tokenizer``) and leaves the tokenizer and the token shards in ``$BLACKMAMBA_CACHE``, where a
``train`` with those settings finds them; it prints the folder. ``inspect`` prints a prepared folder's manifest:
inputs, documents, bad records, tokens per split, each input's and each mixture component's share.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    prep = sub.add_parser("prepare", help="tokenize a corpus (or mixture) into the cache, as train would",
                          description="tokenize a corpus (or mixture) into the cache, as train would")
    prep.add_argument("--data", nargs="+", metavar="PATH",
                      help="files, folders or globs of *.txt / *.md, *.jsonl(.gz|.zst), *.parquet, and "
                           "hf:NAME[:CONFIG][:SPLIT] datasets (default: the embedded Shakespeare corpus)")
    prep.add_argument("--config", metavar="FILE.toml", help="a train settings file: its [data] and [[data.mixture]]")
    prep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a data setting, e.g. --set data.vocab_size=8192 (repeatable)")
    prep.add_argument("--tokenizer", metavar="FILE_OR_HUB_ID", help="use this tokenizer.json instead of a BPE")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    ins = sub.add_parser("inspect", help="show a prepared corpus' manifest",
                         description="show a prepared corpus' manifest")
    ins.add_argument("folder", help="a prepared folder (the one data prepare prints), holding manifest.json")


def run(args: argparse.Namespace) -> int:
    from ..data.prepare import MANIFEST, describe_manifest

    if args.action == "inspect":
        import json
        from pathlib import Path

        from ..data.corpus import DataError

        path = Path(args.folder).expanduser()
        path = path if path.name == MANIFEST else path / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: no such manifest (data prepare prints the folder it fills)") from None
        except ValueError as e:
            raise DataError(f"{path}: not a manifest ({e})") from None
        print(f"{path.parent}: {manifest['dtype']} tokens, tokenizer sha256 {manifest['tokenizer_sha256'][:16]}, "
              f"{manifest['val_fraction']:.0%} held out\n{describe_manifest(manifest)}")
        return 0
    from ..data.prepare import prepare_data
    from ..train.config import build_config, set_value

    cfg = build_config(None, args.config, args.set)
    if args.data:
        set_value(cfg, "data.paths", [str(p) for p in args.data], "--data")
    if args.tokenizer:
        set_value(cfg, "data.tokenizer", args.tokenizer, "--tokenizer")
    cfg.validate()
    d = cfg.data
    data = prepare_data(d.paths or None, val_fraction=d.val_fraction, vocab_size=d.vocab_size, tokenizer=d.tokenizer,
                        text_field=d.text_field, mixture=d.mixture or None,
                        progress=not args.no_progress and sys.stderr.isatty(), log=print)
    folder = data.train.meta.get("folder")
    print(f"{folder}\n{data.describe()}")
    return 0
