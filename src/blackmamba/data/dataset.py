"""Token datasets: a corpus split tokenized once into a memmapped file, and random contiguous windows
drawn from it in a deterministic, resumable order.

File format: ``NAME.bin`` holds the token ids (uint16 when the vocabulary fits, else uint32), every
document as ``[EOS] + ids(text)``; ``NAME.json`` holds the meta data (dtype, token, byte and document
counts, the tokenizer's and the corpus' sha256). The meta file is written last, so a ``.bin`` without a
matching ``.json`` is never used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .corpus import DataError, Document
from .tokenizer import TextTokenizer

FORMAT_VERSION = 1
PIECE_CHARS = 1 << 14  # documents are encoded in pieces of about this many characters, in parallel


# ----------------------------------------------------------------------------- encoding
def split_for_encoding(text: str, size: int = PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters at places where byte-level BPE cannot merge
    across: just after a newline that follows a non-space character and precedes one. Encoding the
    pieces separately then gives exactly the ids of encoding the whole text."""
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


def encode_documents(docs: list[Document], tokenizer: TextTokenizer) -> list[np.ndarray]:
    """Every document as ``[EOS] + ids(text)`` (the EOS id is 0 when the tokenizer has none)."""
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    pieces, owner = [], []
    for i, d in enumerate(docs):
        for piece in split_for_encoding(d.text):
            pieces.append(piece)
            owner.append(i)
    encoded = tokenizer.encode_batch(pieces)  # parallel threads inside the tokenizers library
    per_doc: list[list[int]] = [[eos] for _ in docs]
    for i, ids in zip(owner, encoded):
        per_doc[i].extend(ids)
    return [np.asarray(ids, dtype=np.int64) for ids in per_doc]


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
    from ..checkpoint import atomic_write_with, write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    arrays = encode_documents(docs, tokenizer)
    n = sum(len(a) for a in arrays)

    def write(tmp: str) -> None:
        mm = np.memmap(tmp, dtype=dtype, mode="w+", shape=(max(n, 1),))
        pos = 0
        for a in arrays:
            mm[pos:pos + len(a)] = a.astype(dtype)
            pos += len(a)
        mm.flush()
        del mm
        os.truncate(tmp, n * dtype.itemsize)

    atomic_write_with(path, write)
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
