"""From the user's data to what training reads: the tokenizer and the token shards of each split, with a manifest.

    data = prepare_data(["notes/", "web/*.jsonl.gz", "hf:owner/name"], vocab_size=4096, progress=True)
    data.tokenizer, data.train, data.val      # TextTokenizer, ShardedTokens, ShardedTokens
    data.manifest                             # inputs, documents, bad records, bytes and tokens per split

``data`` is a list of sources (``sources.expand``: files, folders, globs, ``hf:`` datasets), None for the
embedded Shakespeare corpus, or a ``Corpus`` already in memory and split.

How it scales: every input is read as a stream of documents, split (``corpus.Splitter``) and encoded a chunk of
about ``CHUNK_CHARS`` characters at a time, the chunk's pieces in parallel (``tokenizers``' batch encoder, every
core), into one shard per split per chunk. Memory stays bounded by a chunk (and by the largest single text file,
which is one document), whatever the corpus' size. Each chunk ends with a small JSON record (documents consumed,
tokens and bytes per split, bad records so far, whether the input ended), written after its shards, so an
interrupted preparation resumes at the last complete chunk.

Layout and reuse, under ``$BLACKMAMBA_CACHE``: ``tokenizers/KEY/`` the trained BPE (keyed by the inputs'
content, the split and the vocabulary size); ``tokens/inputs/KEY/`` one input's chunks, shards and summary
(``input.json``), keyed by its content, the split and the tokenizer, so that a changed input is tokenized again
and the others are not; ``tokens/KEY/manifest.json`` the dataset: its inputs' summaries and folders. An input's
content key is the sha256 of its bytes (of a hf: dataset, the datasets library's fingerprint), remembered by
path, size and times (``sources.Memo``) so that an unchanged file is not read to find it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import (SHAKESPEARE, Corpus, DataError, Document, Splitter, bad_records, cache_dir, empty_corpus,
                     fetch, read_tarball)
from .dataset import ShardedTokens, encode_documents, token_dtype
from .sources import Input, Memo, MemoryInput, SourceReport, input_line, inputs
from .tokenizer import TOKENIZER_NAME, TextTokenizer, load_tokenizer, train_bpe

FORMAT_VERSION = 2
CHUNK_CHARS = 1 << 25  # characters of text per chunk (one shard per split): the memory bound of preparation
BPE_SAMPLE_CHARS = 1 << 28  # characters of training text a BPE is trained on at most
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


@dataclass
class Component:
    """A part of a data mixture: its name, weight and token streams."""

    name: str
    weight: float
    train: ShardedTokens
    val: ShardedTokens


@dataclass
class PreparedData:
    tokenizer: TextTokenizer
    train: ShardedTokens  # every input's training tokens, in order
    val: ShardedTokens
    manifest: dict
    components: list[Component]  # the mixture (one component of weight 1 without one)

    def describe(self) -> str:
        """One line per input (documents, bad records, tokens per split), as ``blackmamba data inspect`` shows."""
        return describe_manifest(self.manifest)

    def val_text(self, max_tokens: int = 1 << 20) -> str:
        """The held-out text (its first ``max_tokens`` tokens), decoded back (byte-level BPE is lossless)."""
        return self.tokenizer.decode(np.asarray(self.val[:max_tokens]).tolist())


def _key(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _memo(cache: Path | None) -> Path:
    return (cache or cache_dir()) / "input-sha256.json"


def _inputs(data, text_field: str, cache: Path | None, memo: Memo) -> list[Input]:
    if isinstance(data, Corpus):  # already split
        docs = ([Document(d.name, d.text, d.record, "train") for d in data.train]
                + [Document(d.name, d.text, d.record, "val") for d in data.val])
        return [MemoryInput(data.name, docs)]
    if not data:
        return [MemoryInput("shakespeare", read_tarball(fetch(SHAKESPEARE, cache), SHAKESPEARE.members))]
    return inputs(data, text_field, memo)


def _split_stream(inp: Input, split: Splitter, report: SourceReport, skip: int = 0):
    """(documents consumed, training text, validation text) per document of ``inp``, the first ``skip`` read and
    not split (they were, before an interruption)."""
    for n, d in enumerate(inp.documents(report), 1):
        if n <= skip:
            if n == skip:  # the bad records before it were counted in the chunks already written
                report.bad.clear()
            continue
        if d.split is not None:  # already split
            yield n, (d.text if d.split == "train" else ""), (d.text if d.split == "val" else "")
        else:
            a, b = split(d)
            yield n, a, b


def bpe_for(ins: list[Input], corpus_key: str, val_fraction: float, vocab_size: int,
            cache: Path | None = None) -> TextTokenizer:
    """The byte-level BPE of ``vocab_size`` ids trained on the training split of ``ins`` (cached, streaming; on at
    most ``BPE_SAMPLE_CHARS`` characters of it, an equal share from each input: a few hundred MB show a BPE all
    the merges it keeps)."""
    path = (cache or cache_dir()) / "tokenizers" / _key("bpe-v2", str(vocab_size), corpus_key) / TOKENIZER_NAME
    if path.is_file():
        return load_tokenizer(path)

    def texts():  # at most BPE_SAMPLE_CHARS, an equal share from each input: memory and time stay bounded
        share = BPE_SAMPLE_CHARS // len(ins)
        for inp in ins:
            taken = 0
            for _, a, _ in _split_stream(inp, Splitter(val_fraction), SourceReport(inp.name)):
                if a:
                    yield a
                    taken += len(a)
                    if taken >= share:
                        break

    tok = train_bpe(texts(), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok


def _write_shard(path: Path, ids: list[np.ndarray], dtype: np.dtype) -> int:
    from ..files import atomic_file

    n = 0
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        for a in ids:
            f.write(a.astype(dtype).tobytes())
            n += len(a)
    return n


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _complete(folder: Path, record: dict, dtype: np.dtype) -> bool:
    """Whether every shard a chunk record (or an input summary) names is on disk at its size."""
    shards = ([[record[s]["shard"], record[s]["tokens"]] for s in SPLITS] if "shard" in record.get("train", {})
              else [sh for s in SPLITS for sh in record[s]["shards"]])
    for name, n in shards:
        try:
            if (folder / name).stat().st_size != n * dtype.itemsize:
                return False
        except OSError:
            return False
    return True


def _tokenize_input(inp: Input, folder: Path, tok: TextTokenizer, val_fraction: float, dtype: np.dtype,
                    bar) -> tuple[dict, int]:
    """Tokenize ``inp`` into its own ``folder``, chunk by chunk, resuming after the last complete chunk; returns
    (its summary: documents, bad records, per split tokens, bytes, documents and shards; the text bytes tokenized
    by this call)."""
    from ..files import write_json

    done = _read_json(folder / "input.json")
    if done is not None and _complete(folder, done, dtype):
        bar.update(done["read"])
        return done, 0
    folder.mkdir(parents=True, exist_ok=True)
    chunks = []
    while (c := _read_json(folder / f"chunk-{len(chunks):05d}.json")) is not None and _complete(folder, c, dtype):
        chunks.append(c)
    report = SourceReport(inp.name)
    split = Splitter(val_fraction, records=chunks[-1]["records"] if chunks else 0)
    texts: dict[str, list[Document]] = {s: [] for s in SPLITS}
    worked = 0

    def flush(n_docs: int, finished: bool) -> None:
        nonlocal worked
        c = len(chunks)
        record = {"documents": n_docs, "records": split.records, "read": report.read, "finished": finished,
                  "text": any(not d.text.isspace() for s in SPLITS for d in texts[s]) or bool(chunks and
                                                                                             chunks[-1]["text"])}
        for s in SPLITS:
            name = f"{s}-{c:05d}.bin"
            tokens = _write_shard(folder / name, list(encode_documents(texts[s], tok)), dtype)
            nbytes = sum(len(d.text.encode()) for d in texts[s])
            record[s] = {"shard": name, "tokens": tokens, "documents": len(texts[s]), "bytes": nbytes}
            worked += nbytes
            texts[s] = []
        record["bad"] = _add(chunks[-1]["bad"] if chunks else {}, report.bad)
        report.bad.clear()
        write_json(folder / f"chunk-{c:05d}.json", record)
        chunks.append(record)

    if not (chunks and chunks[-1]["finished"]):  # else only the summary was missing
        skip = chunks[-1]["documents"] if chunks else 0
        size, n, seen = 0, skip, 0
        for n, a, b in _split_stream(inp, split, report, skip):
            for s, text in (("train", a), ("val", b)):
                if text:
                    texts[s].append(Document("", text))
                    size += len(text)
            bar.update(report.read - seen)
            seen = report.read
            if size >= CHUNK_CHARS:
                flush(n, finished=False)
                size = 0
        bar.update(report.read - seen)
        flush(n, finished=True)
    summary = {"name": inp.name, "documents": chunks[-1]["documents"], "bad": chunks[-1]["bad"],
               "text": chunks[-1]["text"], "read": chunks[-1]["read"],
               "bytes": sum(c[s]["bytes"] for c in chunks for s in SPLITS)}
    for s in SPLITS:
        summary[s] = {"tokens": sum(c[s]["tokens"] for c in chunks), "bytes": sum(c[s]["bytes"] for c in chunks),
                      "documents": sum(c[s]["documents"] for c in chunks),
                      "shards": [[c[s]["shard"], c[s]["tokens"]] for c in chunks]}
    write_json(folder / "input.json", summary)
    return summary, worked


def _add(a: dict, b) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def prepare_data(data=None, *, val_fraction: float = 0.05, vocab_size: int = 2048,
                 tokenizer: TextTokenizer | str | None = None, text_field: str = "text", cache: Path | None = None,
                 progress: bool = False, log=None, mixture: list[dict] | None = None) -> PreparedData:
    """Tokenize ``data`` (see the module docstring) with ``tokenizer`` (a tokenizer, a tokenizer.json path or hub
    id, or None to train — or reuse — a byte-level BPE of ``vocab_size`` ids on the training split); reuses what
    an earlier call made from the same content. ``progress``: a tqdm bar of the input read (MB/s, and the time
    left where the inputs' sizes are known); ``log``: receives one line when something was tokenized.
    ``mixture`` (instead of ``data``): ``[{"paths": [...], "weight": w, "name": optional}, ...]``, components
    sampled in proportion to their weights (``dataset.MixtureSampler``); the tokenizer is trained on all of them."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction = {val_fraction}: must be between 0 and 1 (exclusive)")
    memo = Memo(_memo(cache))
    parts = None
    if mixture:
        if data:
            raise DataError("give the data or a mixture, not both")
        ins, parts = [], []
        for j, entry in enumerate(mixture):
            paths = entry["paths"]
            these = inputs([paths] if isinstance(paths, (str, Path)) else paths, text_field, memo)
            parts.append({"name": entry.get("name") or f"mixture[{j}]", "weight": float(entry["weight"]),
                          "inputs": list(range(len(ins), len(ins) + len(these)))})
            ins += these
    else:
        ins = _inputs([data] if isinstance(data, (str, Path)) else data, text_field, cache, memo)
    keys = [inp.key() for inp in ins]
    memo.save()
    corpus_key = hashlib.sha256("|".join([f"v{FORMAT_VERSION}", str(val_fraction), *keys]).encode()).hexdigest()
    if tokenizer is None:
        tok = bpe_for(ins, corpus_key, val_fraction, vocab_size, cache)
    elif isinstance(tokenizer, TextTokenizer):
        tok = tokenizer
    else:
        tok = load_tokenizer(tokenizer)
    root = (cache or cache_dir()) / "tokens"
    manifest = _tokenize(ins, keys, root, tok, val_fraction, corpus_key, text_field, progress, log)
    # (the mixture's grouping and weights are not in the manifest: they choose windows, not tokens)
    manifest = {**manifest, "components": parts or [{"name": "all", "weight": 1.0,
                                                     "inputs": list(range(len(manifest["inputs"])))}]}
    return _open(root, manifest, tok)


def _tokenize(ins, keys, root, tok, val_fraction, corpus_key, text_field, progress, log) -> dict:
    """Every input tokenized into its own folder under ``root / "inputs"`` (keyed by its content, the split and the
    tokenizer: a changed input is tokenized again, the others are not), and the dataset's manifest."""
    from tqdm.auto import tqdm

    from ..files import write_json

    dtype = token_dtype(tok.vocab_size)
    sizes = [inp.size for inp in ins]
    total = sum(sizes) if all(s is not None for s in sizes) else None
    t0, worked, summaries = time.perf_counter(), 0, []
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenizing", disable=not progress,
              dynamic_ncols=True, leave=False) as bar:
        for inp, key in zip(ins, keys):
            folder = f"inputs/{_key(f'v{FORMAT_VERSION}', key, str(val_fraction), tok.sha256())}"
            summary, done = _tokenize_input(inp, root / folder, tok, val_fraction, dtype, bar)
            summaries.append({**summary, "name": inp.name, "sha256": key, "folder": folder})
            worked += done
    seconds = time.perf_counter() - t0
    if not any(s["text"] for s in summaries):
        where = ", ".join(s["name"] for s in summaries[:3]) + (", ..." if len(summaries) > 3 else "")
        raise empty_corpus(where, sum(sum(s["bad"].values()) for s in summaries))
    if not all(sum(s[split]["tokens"] for s in summaries) for split in SPLITS):
        raise DataError(f"corpus too small to hold out {val_fraction:.0%} for validation at a line break (or one "
                        f"record in {max(2, round(1 / val_fraction))}): give more text")
    manifest = {"format": FORMAT_VERSION, "dtype": dtype.name, "corpus_sha256": corpus_key,
                "tokenizer_sha256": tok.sha256(), "vocab_size": tok.vocab_size, "val_fraction": val_fraction,
                "text_field": text_field, "inputs": summaries}
    directory = root / _key(corpus_key, tok.sha256())
    if _read_json(directory / MANIFEST) != manifest:
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / MANIFEST, manifest)
    if log is not None and worked:
        mb = worked / 1e6
        log(f"tokenized {mb:,.1f} MB of text in {seconds:.1f} s ({mb / max(seconds, 1e-9):,.1f} MB/s) into "
            f"{root / 'inputs'}")
    return {**manifest, "folder": str(directory)}


def _open(root: Path, manifest: dict, tok: TextTokenizer) -> PreparedData:
    meta = {**{k: manifest[k] for k in ("corpus_sha256", "tokenizer_sha256")}, "folder": manifest["folder"]}
    dtype = np.dtype(manifest["dtype"])

    def stream(split: str, which: list[int]) -> ShardedTokens:
        chosen = [manifest["inputs"][i] for i in which]
        shards = [(root / inp["folder"] / name, n) for inp in chosen for name, n in inp[split]["shards"]]
        return ShardedTokens(shards, dtype, sum(inp[split]["bytes"] for inp in chosen), {**meta, "split": split})

    every = list(range(len(manifest["inputs"])))
    parts = [Component(c["name"], c["weight"], stream("train", c["inputs"]), stream("val", c["inputs"]))
             for c in manifest["components"]]
    for c in parts:
        if c.train.num_tokens == 0:
            raise DataError(f"mixture component {c.name}: no training tokens")
    return PreparedData(tok, stream("train", every), stream("val", every), manifest, parts)


def describe_manifest(manifest: dict, most: int = 10) -> str:
    """Per input: documents, bad records, tokens per split and its share of the training tokens; and a total."""
    ins = manifest["inputs"]
    total = sum(i["train"]["tokens"] for i in ins) or 1
    lines = []
    for inp in ins[:most]:
        lines.append(input_line(inp["name"], inp["documents"], inp["bytes"], inp["bad"],
                                f", {inp['train']['tokens']:,} training + {inp['val']['tokens']:,} validation tokens "
                                f"({inp['train']['tokens'] / total:.1%} of training)"))
    if len(ins) > most:
        lines.append(f"... and {len(ins) - most:,} more inputs")
    parts = manifest.get("components", [])
    if len(parts) > 1:
        weight = sum(c["weight"] for c in parts)
        for c in parts:
            tokens = sum(ins[i]["train"]["tokens"] for i in c["inputs"])
            lines.append(f"mixture {c['name']}: weight {c['weight'] / weight:.1%}, {len(c['inputs'])} input"
                         f"{'' if len(c['inputs']) == 1 else 's'}, {tokens:,} training tokens ({tokens / total:.1%} "
                         f"of them)")
    if len(ins) > 1:
        bad = sum(sum(i["bad"].values()) for i in ins)
        lines.append(f"in all: {len(ins):,} inputs, {sum(i['documents'] for i in ins):,} documents, "
                     f"{sum(i['train']['tokens'] for i in ins):,} training + "
                     f"{sum(i['val']['tokens'] for i in ins):,} validation tokens, {bad_records(bad)} skipped")
    return "\n".join(lines)
