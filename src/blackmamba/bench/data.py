"""The data benchmark (``blackmamba bench --data``): preparing a large JSONL corpus (``data.prepare``) against the
``tokenizers`` library's own batch encoder running alone on the same text, and the preparation's peak memory.

A JSONL file of ``size_mb`` (300 by default; ``--quick``: 8) of generated prose (seeded: the same file every run)
is written to a temporary folder, with a byte-level BPE of 8192 ids trained on its first 4 MB. Then, each in a
fresh process so that neither inherits the other's memory:

- baseline: the texts read from the file, then only ``Tokenizer.encode_batch`` timed, in batches of 8 MB of
  text (its threads on every core);
- ours: ``prepare_data([file], tokenizer=...)``: reading, JSON, splitting, encoding, writing the shards and the
  manifest, timed whole; its peak resident set (``ru_maxrss``).

Targets: ours within 1.5x the baseline's time; peak RSS under 1 GB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SYLLABLES = ["an", "bel", "cor", "da", "en", "fir", "gal", "hon", "is", "jun", "kel", "lo", "mar", "ne", "or",
              "pel", "qua", "ros", "sil", "tor", "um", "ver", "wil", "xan", "yor", "zel", "th", "st", "ing", "ed"]


def write_corpus(path: Path, size_mb: float, seed: int = 0) -> int:
    """A JSONL file of about ``size_mb`` MB of generated prose records ({"text": ...}); returns its size."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4))) for _ in range(5000)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    target, written = int(size_mb * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            idx = rng.choice(len(words), size=(64, 400), p=zipf)  # 64 records of 400 words
            for row in idx:
                sentences = " ".join(words[i] for i in row).split(" ")
                text = ". ".join(" ".join(sentences[j:j + 12]).capitalize() for j in range(0, len(sentences), 12))
                line = json.dumps({"text": text + "."}) + "\n"
                f.write(line)
                written += len(line)
    return path.stat().st_size


def _baseline(corpus: str, tokenizer: str) -> float:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    batches, cur, size = [], [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            cur.append(json.loads(line)["text"])
            size += len(cur[-1])
            if size >= 1 << 23:
                batches.append(cur)
                cur, size = [], 0
    batches.append(cur)
    t0 = time.perf_counter()
    for b in batches:
        tok.encode_batch(b, add_special_tokens=False)
    return time.perf_counter() - t0


def _ours(corpus: str, tokenizer: str, cache: str) -> float:
    from ..data.prepare import prepare_data

    t0 = time.perf_counter()
    prepare_data([corpus], tokenizer=tokenizer, cache=Path(cache))
    return time.perf_counter() - t0


def _child(kind: str, *args: str) -> dict:
    """Run one measurement in a fresh process; returns its seconds and peak RSS (bytes)."""
    code = (f"import json, resource; from blackmamba.bench.data import _{kind} as f; s = f(*{list(args)!r}); "
            f"print(json.dumps({{'seconds': s, 'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"the {kind} measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_data_bench(size_mb: float | None = None, quick: bool = False) -> dict:
    from ..data.tokenizer import train_bpe
    from .harness import row

    size_mb = size_mb or (8 if quick else 300)
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        nbytes = write_corpus(corpus, size_mb)
        with open(corpus, encoding="utf-8") as f:
            sample = []
            for line in f:
                sample.append(json.loads(line)["text"])
                if sum(map(len, sample)) > 4e6:
                    break
        tok = train_bpe(sample, 8192)
        tok_path = Path(tmp) / "tokenizer.json"
        tok.save(tok_path)
        base = _child("baseline", str(corpus), str(tok_path))
        ours = _child("ours", str(corpus), str(tok_path), str(Path(tmp) / "cache"))
        manifest = next((Path(tmp) / "cache").rglob("manifest.json"))
        tokens = sum(i["train"]["tokens"] + i["val"]["tokens"] for i in json.loads(manifest.read_text())["inputs"])
    mb = nbytes / 1e6
    row(rows, f"prepare a {mb:,.0f} MB JSONL file (read, split, encode, write shards)", mb / ours["seconds"],
        "MB/s", baseline="tokenizers' encode_batch alone, same text", ratio=ours["seconds"] / base["seconds"],
        target=("max", 1.5), quick=quick)
    row(rows, "  peak resident memory while preparing it", ours["rss"] / 1e6, "MB", baseline="1 GB",
        ratio=ours["rss"] / 1e9, target=("max", 1.0), quick=quick)
    notes.append(f"{os.cpu_count()} cores; {tokens:,} tokens; encode_batch alone {base['seconds']:.1f} s "
                 f"({mb / base['seconds']:.1f} MB/s of JSONL), prepare_data {ours['seconds']:.1f} s; ratio of time "
                 f"= ours / baseline")
    return {"device": "cpu", "quick": quick, "rows": rows, "notes": notes, "size_mb": mb}

