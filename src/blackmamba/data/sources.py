"""Where the documents of a corpus come from: files, folders, globs and Hugging Face datasets, in the formats
users have them.

    docs, report = read_sources(["notes/", "shards/*.jsonl.gz", "hf:owner/name:config:train"], text_field="text")
    print(report.describe())          # per source: documents, bytes, bad records skipped (by reason)

A source is

- a file, by its name: ``.txt`` / ``.md`` / ``.text`` (the whole file is one document; it must be UTF-8);
  ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` (one document per line: a JSON object whose ``text_field`` is a
  string); ``.parquet`` (one document per row of the ``text_field`` column, read a row group at a time, with
  pyarrow);
- a folder: the files of those formats under it, hidden ones skipped, sorted by path;
- a glob (``*``, ``?``, ``[``): its matches, sorted;
- ``hf:NAME[:CONFIG][:SPLIT]``: a dataset of the ``datasets`` library — a hub id (read from its local cache
  when offline, ``HF_DATASETS_OFFLINE=1``) or a local folder of data files; SPLIT defaults to ``train``.

A record that cannot be a document — a line that is not valid JSON or not an object, a missing or null field,
a value that is not a string, bytes that are not UTF-8 — is skipped and counted, per source and reason, in the
report: never dropped without a number. Blank lines of a JSONL file are not records.

A record is a document of its own (``Document.record``): the validation split holds out whole records, where
a text file's tail is held out (``corpus.split_documents``).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .corpus import DataError, Document, bad_records, decode_utf8, sha256_file

TEXT_SUFFIXES = (".txt", ".md", ".text")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
HF_PREFIX = "hf:"


def input_line(name: str, documents: int, nbytes: int, bad: dict, extra: str = "") -> str:
    """One input in a report: its documents and text, ``extra``, and the records skipped by reason."""
    line = f"{name}: {documents:,} documents, {nbytes / 1e6:,.1f} MB{extra}"
    if bad:
        why = ", ".join(f"{n:,} {reason}" for reason, n in sorted(bad.items(), key=lambda kv: -kv[1]))
        line += f"; {bad_records(sum(bad.values()))} skipped ({why})"
    return line


@dataclass
class SourceReport:
    """What one source gave: documents, their UTF-8 bytes, and the records skipped by reason."""

    name: str
    documents: int = 0
    bytes: int = 0
    bad: Counter = field(default_factory=Counter)
    read: int = 0  # bytes of the input consumed so far (a JSONL file's lines, a text file's bytes; else the text's)

    def describe(self) -> str:
        return input_line(self.name, self.documents, self.bytes, self.bad)


@dataclass
class ReadReport:
    sources: list[SourceReport] = field(default_factory=list)

    @property
    def bad_records(self) -> int:
        return sum(sum(s.bad.values()) for s in self.sources)

    def describe(self) -> str:
        """One line per source."""
        return "\n".join(s.describe() for s in self.sources)


def _format(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in RECORD_SUFFIXES + TEXT_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def expand(spec: str) -> list[str]:
    """The sources a ``--data`` entry names: itself (a file or hf:), a folder's files, or a glob's matches."""
    if spec.startswith(HF_PREFIX):
        return [spec]
    p = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        found = sorted(str(Path(m)) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
        if not found:
            raise DataError(f"{spec}: the pattern matches no file")
        return found
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and _format(f) is not None
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise DataError(f"{p}: directory holds no text, JSONL or Parquet files "
                            f"({', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)})")
        return files
    if p.is_file():
        return [str(p)]
    raise DataError(f"{spec}: no such file or directory")


# ----------------------------------------------------------------------------- readers (one per format)
def _record(value, text_field: str, report: SourceReport) -> str | None:
    """The document text of one record, or None (counted in ``report.bad``)."""
    if not isinstance(value, dict):
        report.bad["not a JSON object"] += 1
        return None
    text = value.get(text_field)
    if text is None:
        report.bad[f"missing {text_field!r}"] += 1
        return None
    if not isinstance(text, str):
        report.bad[f"non-string {text_field!r}"] += 1
        return None
    return text


def _open_binary(path: Path, fmt: str):
    if fmt == ".jsonl.gz":
        return gzip.open(path, "rb")
    if fmt == ".jsonl.zst":
        try:
            from compression import zstd  # Python 3.14

            return zstd.open(path, "rb")
        except ImportError:
            pass
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs zstandard: pip install 'blackmamba[data]'") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _jsonl(path: Path, fmt: str, text_field: str, report: SourceReport) -> Iterator[Document]:
    try:
        with _open_binary(path, fmt) as f:
            for n, raw in enumerate(f, 1):
                report.read += len(raw)
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    report.bad["invalid UTF-8"] += 1
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError:
                    report.bad["invalid JSON"] += 1
                    continue
                text = _record(value, text_field, report)
                if text is not None:
                    yield Document(f"{path}:{n}", text, record=True)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: unreadable ({e})") from None


def _parquet(path: Path, text_field: str, report: SourceReport) -> Iterator[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'blackmamba[data]'") from None

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                        f"choose one with --set data.text_field=NAME")
    row = 0
    for g in range(pf.num_row_groups):  # a row group at a time: memory bounded by the largest group
        for value in pf.read_row_group(g, columns=[text_field]).column(0).to_pylist():
            row += 1
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    report.bad["invalid UTF-8"] += 1
                    continue
            text = _record({text_field: value}, text_field, report)
            if text is not None:
                yield Document(f"{path}:{row}", text, record=True)


def _hf_load(spec: str):
    """The split an hf:NAME[:CONFIG][:SPLIT] spec names, loaded by the datasets library (Arrow, memory-mapped)."""
    parts = spec[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"{spec}: expected hf:NAME[:CONFIG][:SPLIT], e.g. hf:owner/name:default:train")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: reading Hugging Face datasets needs datasets: pip install 'blackmamba[data]'") \
            from None
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, missing repo or split, offline without a cache: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{spec}: could not load the dataset ({type(e).__name__}: {first})") from None


def _hf(spec: str, text_field: str, report: SourceReport) -> Iterator[Document]:
    ds = _hf_load(spec)
    if text_field not in ds.column_names:
        raise DataError(f"{spec}: no column {text_field!r} (columns: {', '.join(ds.column_names)}); choose one "
                        f"with --set data.text_field=NAME")
    row = 0
    for batch in ds.select_columns([text_field]).iter(batch_size=1024):
        for value in batch[text_field]:
            row += 1
            text = _record({text_field: value}, text_field, report)
            if text is not None:
                yield Document(f"{spec}:{row}", text, record=True)


def _text_file(path: Path, report: SourceReport) -> Iterator[Document]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    report.read += len(data)
    yield Document(str(path), decode_utf8(data, str(path)))


def iter_source(source: str, text_field: str, report: SourceReport) -> Iterator[Document]:
    """The documents of one source (a file or hf: spec, as ``expand`` gives them), counting into ``report``."""
    if source.startswith(HF_PREFIX):
        docs = _hf(source, text_field, report)
    else:
        path = Path(source)
        fmt = _format(path)
        if fmt in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
            docs = _jsonl(path, fmt, text_field, report)
        elif fmt == ".parquet":
            docs = _parquet(path, text_field, report)
        else:  # a text file, whatever its name when named explicitly
            docs = _text_file(path, report)
    counts_read = source.startswith(HF_PREFIX) or _format(Path(source)) == ".parquet"  # no raw bytes to count
    for d in docs:
        n = len(d.text.encode())
        report.documents += 1
        report.bytes += n
        if counts_read:
            report.read += n
        yield d


def read_sources(specs: list[str | Path], text_field: str = "text") -> tuple[list[Document], ReadReport]:
    """Every document of the sources ``specs`` name, in order, and what each source gave."""
    report = ReadReport()
    docs: list[Document] = []
    for spec in specs:
        for source in expand(str(spec)):
            r = SourceReport(source)
            report.sources.append(r)
            docs.extend(iter_source(source, text_field, r))
    return docs, report


# ----------------------------------------------------------------------------- inputs: what a prepared dataset reads
class Input:
    """One input of a dataset (a file, an hf: dataset, or documents in memory): ``documents(report)`` reads it
    (streaming, in a fixed order), ``key()`` identifies its content, ``size`` is the bytes it holds (None:
    unknown), for progress."""

    name: str
    size: int | None = None

    def key(self) -> str:
        raise NotImplementedError

    def documents(self, report: SourceReport) -> Iterator[Document]:
        raise NotImplementedError


class Memo:
    """Files' sha256 remembered by path, size, inode and change and modification times (a JSON file): an
    unchanged file is not read again to find its key. Read once, written once (``save``); the most recently used
    ``MEMO_ENTRIES`` are kept."""

    def __init__(self, path: Path | None):
        self.path, self.changed = path, False
        self.entries: dict[str, str] = {}
        if path is not None:
            try:
                got = json.loads(Path(path).read_text())
                self.entries = got if isinstance(got, dict) else {}
            except (OSError, ValueError):
                pass

    @staticmethod
    def stamp(path: str, text_field: str) -> str:
        st = os.stat(path)
        return f"{os.path.abspath(path)}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}|{text_field}"

    def get(self, stamp: str) -> str | None:
        value = self.entries.pop(stamp, None)
        if value is not None:
            self.entries[stamp] = value  # most recently used last
        return value

    def put(self, stamp: str, value: str) -> None:
        self.entries[stamp] = value
        self.changed = True

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        from ..files import write_json

        try:
            write_json(self.path, dict(list(self.entries.items())[-MEMO_ENTRIES:]))
        except OSError:
            pass  # a read-only cache: the files are hashed again next time
        self.changed = False


class SourceInput(Input):
    """A file or an hf: dataset, as ``expand`` names them. Its key is the sha256 of the file's bytes and the
    text field (not of its name: a moved file keeps its tokens), remembered in a ``Memo``."""

    def __init__(self, source: str, text_field: str, memo: Memo | None = None):
        self.name, self.text_field, self.memo = source, text_field, memo or Memo(None)
        plain = not source.startswith(HF_PREFIX) and _format(Path(source)) not in (".jsonl.gz", ".jsonl.zst",
                                                                                 ".parquet")
        self.size = Path(source).stat().st_size if plain else None  # compressed: the text's size is unknown

    def key(self) -> str:
        import hashlib

        h = hashlib.sha256(f"{self.text_field}|".encode())
        if self.name.startswith(HF_PREFIX):  # the datasets library's fingerprint of the loaded split
            h.update(_hf_load(self.name)._fingerprint.encode())
            return h.hexdigest()
        stamp = Memo.stamp(self.name, self.text_field)
        found = self.memo.get(stamp)
        if found is None:
            h.update(sha256_file(Path(self.name)).encode())
            found = h.hexdigest()
            self.memo.put(stamp, found)
        return found

    def documents(self, report: SourceReport) -> Iterator[Document]:
        return iter_source(self.name, self.text_field, report)


class MemoryInput(Input):
    """Documents already in memory (a ``Corpus``'s, or the embedded corpus')."""

    def __init__(self, name: str, docs: list[Document]):
        self.name, self.docs = name, docs
        self.size = sum(len(d.text.encode()) for d in docs)

    def key(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for d in self.docs:
            for part in (d.name, d.text, "r" if d.record else "t", d.split or ""):
                b = part.encode()
                h.update(len(b).to_bytes(8, "little"))
                h.update(b)
        return h.hexdigest()

    def documents(self, report: SourceReport) -> Iterator[Document]:
        for d in self.docs:
            n = len(d.text.encode())
            report.documents += 1
            report.bytes += n
            report.read += n
            yield d


MEMO_ENTRIES = 100_000  # files whose sha256 a Memo keeps (the most recently used)


def inputs(specs: list[str | Path], text_field: str = "text", memo: Memo | None = None) -> list[Input]:
    """The inputs ``--data`` entries name (``expand``), in order; ``memo``: where files' sha256 are remembered."""
    return [SourceInput(source, text_field, memo) for spec in specs for source in expand(str(spec))]
