"""Token datasets: a corpus split tokenized once into a memmapped file, and random contiguous windows
drawn from it in a deterministic, resumable order.

File format: ``NAME.bin`` holds the token ids (uint16 when the vocabulary fits, else uint32), every
document as ``[EOS] + ids(text)``; ``NAME.json`` holds the meta data (dtype, token, byte and document
counts, the tokenizer's and the corpus' sha256). The meta file is written last, so a ``.bin`` without a
matching ``.json`` is never used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .corpus import DataError, Document
from .tokenizer import TextTokenizer

FORMAT_VERSION = 1
PIECE_CHARS = 1 << 14  # text is cut into pieces of about this many characters, encoded in parallel threads
BATCH_CHARS = 1 << 23  # pieces are encoded and written this many characters at a time (bounded memory)


# ----------------------------------------------------------------------------- encoding
def split_for_encoding(text: str, size: int = PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters at places where byte-level BPE cannot merge
    across: just after a newline that follows a non-space character and precedes one. With the GPT-2
    split pattern of byte-level BPE (ours, GPT-NeoX's) no pre-token spans such a place, so encoding the
    pieces separately gives exactly the ids of encoding the whole text."""
    pieces, start = [], 0
    while len(text) - start > size:
        p = start + size
        while p < len(text) and not (text[p - 1] == "\n" and not text[p - 2].isspace() and not text[p].isspace()):
            p += 1
        if p >= len(text):
            break
        pieces.append(text[start:p])
        start = p
    pieces.append(text[start:])
    return pieces


def encode_documents(docs: list[Document], tokenizer: TextTokenizer, batch_chars: int = BATCH_CHARS
                     ) -> Iterator[np.ndarray]:
    """The token stream of ``docs``, every document as ``[EOS] + ids(text)`` (EOS id 0 when the tokenizer
    has none), yielded in order, one int64 array per batch of about ``batch_chars`` characters: pieces
    of a batch are encoded in parallel, and memory stays bounded however large the corpus is."""
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    pieces: list[str] = []
    starts: list[bool] = []  # whether the piece begins a document (gets the EOS in front)
    size = 0

    def flush() -> np.ndarray:
        out: list[int] = []
        for first, ids in zip(starts, tokenizer.encode_batch(pieces)):
            if first:
                out.append(eos)
            out.extend(ids)
        pieces.clear()
        starts.clear()
        return np.asarray(out, dtype=np.int64)

    for d in docs:
        for i, piece in enumerate(split_for_encoding(d.text)):
            pieces.append(piece)
            starts.append(i == 0)
            size += len(piece)
            if size >= batch_chars:
                yield flush()
                size = 0
    if pieces:
        yield flush()


# ----------------------------------------------------------------------------- token files
@dataclass
class TokenFile:
    path: Path  # the .bin file
    meta: dict
    tokens: np.ndarray  # (num_tokens,) memmap, uint16 or uint32

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def num_bytes(self) -> int:
        """UTF-8 bytes of the text these tokens encode (EOS separators encode none)."""
        return int(self.meta["num_bytes"])

    @classmethod
    def open(cls, path: Path) -> "TokenFile":
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        dtype = np.dtype(meta["dtype"])
        n = int(meta["num_tokens"])
        if path.stat().st_size != n * dtype.itemsize:
            raise DataError(f"{path}: size {path.stat().st_size} does not match {n} {dtype} tokens")
        return cls(path, meta, np.memmap(path, dtype=dtype, mode="r", shape=(n,)))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_token_file(path: Path, docs: list[Document], tokenizer: TextTokenizer, key: dict) -> TokenFile:
    """Encode ``docs`` into ``path`` (.bin) + meta (.json), both written atomically."""
    from ..files import atomic_file, write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    n = 0
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        for ids in encode_documents(docs, tokenizer):
            f.write(ids.astype(dtype).tobytes())
            n += len(ids)
    meta = {"format": FORMAT_VERSION, "dtype": dtype.name, "num_tokens": n, "num_docs": len(docs),
            "num_bytes": sum(len(d.text.encode()) for d in docs), **key}
    write_json(path.with_suffix(".json"), meta)
    return TokenFile.open(path)


def open_or_write(path: Path, docs: list[Document], tokenizer: TextTokenizer, key: dict) -> TokenFile:
    """Reuse ``path`` when its meta matches ``key`` (same corpus, same tokenizer); else (re)write it."""
    meta_path = Path(path).with_suffix(".json")
    if Path(path).is_file() and meta_path.is_file():
        try:
            tf = TokenFile.open(path)
            if all(tf.meta.get(k) == v for k, v in key.items()) and tf.meta.get("format") == FORMAT_VERSION:
                return tf
        except (OSError, ValueError, KeyError):
            pass  # unreadable or stale: write it again
    return write_token_file(path, docs, tokenizer, key)


# ----------------------------------------------------------------------------- windows
class WindowSampler:
    """Contiguous windows of ``seq_len + 1`` tokens (inputs + shifted targets) in a seeded order.

    Epoch e uses a random offset o_e < seq_len and visits the non-overlapping windows starting at
    ``o_e + seq_len * j`` in a random permutation. Window number k (counting across epochs) is a pure
    function of (seed, k), so the data position to save for an exact resume is just k.
    """

    def __init__(self, num_tokens: int, seq_len: int, seed: int):
        if num_tokens < 2 * seq_len + 1:
            raise DataError(f"the training split has {num_tokens} tokens, too few for windows of {seq_len}: "
                            f"give more text or a smaller data.seq_len")
        self.seq_len = seq_len
        self.seed = seed
        self.per_epoch = (num_tokens - 1 - seq_len) // seq_len  # fits for every offset < seq_len
        self._epoch: int | None = None
        self._offset = 0
        self._perm: torch.Tensor | None = None

    def _load_epoch(self, epoch: int) -> None:
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._offset = int(torch.randint(0, self.seq_len, (1,), generator=g))
            self._perm = torch.randperm(self.per_epoch, generator=g)
            self._epoch = epoch

    def start(self, k: int) -> int:
        """First token of window k."""
        self._load_epoch(k // self.per_epoch)
        return self._offset + self.seq_len * int(self._perm[k % self.per_epoch])

    def batch(self, tokens: np.ndarray, first: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows first .. first + batch_size - 1 → (inputs (b, L), targets (b, L)) int64."""
        L = self.seq_len
        rows = np.stack([np.asarray(tokens[s:s + L + 1], dtype=np.int64)
                         for s in (self.start(first + i) for i in range(batch_size))])
        t = torch.from_numpy(rows)  # (b, L + 1)
        return t[:, :-1], t[:, 1:]
