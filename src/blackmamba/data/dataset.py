"""Token datasets: a split's token stream (``ShardedTokens``: shard files seen as one array; ``prepare.py``
writes them), the encoding that makes them, and random contiguous windows drawn from them in a deterministic,
resumable order (``WindowSampler``).

Every document is stored as ``[EOS] + ids(text)``, ids as uint16 when the vocabulary fits, else uint32.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .corpus import DataError, Document
from .tokenizer import TextTokenizer

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


def encode_documents(docs: Iterable[Document], tokenizer: TextTokenizer, batch_chars: int = BATCH_CHARS
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
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardedTokens:
    """A split's token stream, stored as shard files (``.bin``: raw uint16 / uint32 ids) read as memmaps, seen
    as one array: ``tokens[a:b]`` reads across shard boundaries, ``len(tokens)`` counts them all.

    ``num_bytes``: UTF-8 bytes of the text the tokens encode (EOS separators encode none); ``meta``: what they
    were made from (``corpus_sha256``, ``tokenizer_sha256``, ...). ``tokens`` is the object itself, so code
    written for one memmap (``WindowSampler.batch``, validation) reads it unchanged. Shards are mapped when first
    read, at most ``OPEN_SHARDS`` at a time (each map holds a file descriptor: a corpus of thousands of files
    must not exhaust them)."""

    OPEN_SHARDS = 64
    _open: "OrderedDict[Path, np.memmap]" = OrderedDict()  # shared by every stream: the most recently read last

    def __init__(self, shards: list[tuple[Path, int]], dtype: np.dtype, num_bytes: int, meta: dict):
        self.dtype = np.dtype(dtype)
        self.meta, self._bytes = meta, int(num_bytes)
        self._paths, self._counts, self._starts, n = [], [], [], 0
        for path, count in shards:
            if count == 0:
                continue
            path = Path(path)
            try:
                size = path.stat().st_size
            except OSError:
                raise DataError(f"{path}: a token shard is missing; delete {path.parent} to tokenize it again") \
                    from None
            if size != count * self.dtype.itemsize:
                raise DataError(f"{path}: size {size} does not match {count} {self.dtype} tokens; delete "
                                f"{path.parent} to tokenize it again")
            self._paths.append(path)
            self._counts.append(count)
            self._starts.append(n)
            n += count
        self._n = n

    def _map(self, s: int) -> np.memmap:
        path, cache = self._paths[s], ShardedTokens._open
        m = cache.pop(path, None)
        if m is None:
            m = np.memmap(path, dtype=self.dtype, mode="r", shape=(self._counts[s],))
            while len(cache) >= self.OPEN_SHARDS:
                cache.popitem(last=False)
        cache[path] = m
        return m

    @property
    def tokens(self) -> "ShardedTokens":
        return self

    @property
    def num_tokens(self) -> int:
        return self._n

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            a, b, step = index.indices(self._n)
            if step != 1:
                raise ValueError("token streams slice contiguously")
            return self._read(a, b)
        i = int(index) + (self._n if int(index) < 0 else 0)
        if not 0 <= i < self._n:
            raise IndexError(f"token {index} of {self._n}")
        return self._read(i, i + 1)[0]

    def _read(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) as one array (a view when they lie in one shard)."""
        if b <= a:
            return np.empty(0, dtype=self.dtype)
        s = int(np.searchsorted(self._starts, a, side="right")) - 1
        parts = []
        while a < b:
            m, start = self._map(s), self._starts[s]
            take = min(b, start + len(m)) - a
            parts.append(m[a - start:a - start + take])
            a += take
            s += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):
        out = self._read(0, self._n)
        return out.astype(dtype) if dtype is not None else np.array(out)


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
            # int32 (the same permutation as int64's, half the memory: 4 bytes a window) where it can hold it
            small = self.per_epoch < 2**31
            self._perm = torch.randperm(self.per_epoch, generator=g, dtype=torch.int32 if small else torch.int64)
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


class MixtureSampler:
    """Windows drawn from several token streams (a data mixture's components) in proportion to their weights,
    whatever their sizes: window k (counting from the run's start) is a pure function of (seed, k), so a run
    resumes at the exact window and N data-parallel ranks reading windows k, k+1, ... see what one process sees.

    The windows come in blocks of ``BLOCK``: a block holds round(w_c × BLOCK) windows of component c (largest
    remainders make the sum exact; a component whose share rounds to none is refused) in a seeded random order,
    so at every block boundary the run has read each component in proportion to its weight, to 1/BLOCK.
    Component c's own windows follow its ``WindowSampler`` (seed + c; its epochs, each
    with a random offset and order): a small component is repeated, a large one is not exhausted. One
    component with weight 1 gives exactly its ``WindowSampler``'s windows."""

    BLOCK = 1000

    def __init__(self, streams: list, weights: list[float], seq_len: int, seed: int, names: list[str] | None = None):
        if len(streams) != len(weights) or not streams or min(weights) <= 0:
            raise ValueError("a mixture needs one positive weight per stream")
        self.streams, self.seq_len, self.seed = streams, seq_len, seed
        self.names = names or [str(i) for i in range(len(streams))]
        self.samplers = []
        for c, (tokens, name) in enumerate(zip(streams, self.names)):
            try:
                self.samplers.append(WindowSampler(len(tokens), seq_len, seed + c))
            except DataError as e:
                raise DataError(f"{name}: {e}" if len(streams) > 1 else str(e)) from None
        total = sum(weights)
        self.weights = [w / total for w in weights]
        exact = [w * self.BLOCK for w in self.weights]
        counts = [int(x) for x in exact]
        for c in sorted(range(len(exact)), key=lambda c: counts[c] - exact[c])[:self.BLOCK - sum(counts)]:
            counts[c] += 1
        empty = [self.names[c] for c, n in enumerate(counts) if n == 0]
        if empty:
            raise DataError(f"mixture component {empty[0]}: its weight is under 1/{self.BLOCK} of the total, so it "
                            f"would never be read: give it at least {total / self.BLOCK:.3g}")
        self.counts = counts  # windows of each component per block
        self._block: int | None = None
        self._order: np.ndarray | None = None  # component of each position in the current block
        self._rank: np.ndarray | None = None  # its index among its component's windows of the block

    def _load_block(self, block: int) -> None:
        if self._block != block:
            g = torch.Generator().manual_seed(self.seed * 1_000_033 + block + 7)
            order = np.repeat(np.arange(len(self.counts)), self.counts)
            if len(self.counts) > 1:
                order = order[torch.randperm(self.BLOCK, generator=g).numpy()]
            rank = np.empty(self.BLOCK, dtype=np.int64)
            for c in range(len(self.counts)):
                where = np.flatnonzero(order == c)
                rank[where] = np.arange(len(where))
            self._block, self._order, self._rank = block, order, rank

    def window(self, k: int) -> tuple[int, int]:
        """(component, first token) of window k."""
        block, pos = divmod(k, self.BLOCK)
        self._load_block(block)
        c = int(self._order[pos])
        return c, self.samplers[c].start(block * self.counts[c] + int(self._rank[pos]))

    def windows_per_component(self, k: int) -> list[int]:
        """How many of the first k windows each component gave."""
        block, pos = divmod(k, self.BLOCK)
        self._load_block(block)
        return [block * n + int((self._order[:pos] == c).sum()) for c, n in enumerate(self.counts)]

    def epochs(self, k: int) -> list[float]:
        """Passes over each component's windows that the first k windows made."""
        return [n / s.per_epoch for n, s in zip(self.windows_per_component(k), self.samplers)]

    def batch(self, first: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows first .. first + batch_size - 1 → (inputs (b, L), targets (b, L)) int64."""
        L = self.seq_len
        rows = []
        for k in range(first, first + batch_size):
            c, s = self.window(k)
            rows.append(np.asarray(self.streams[c][s:s + L + 1], dtype=np.int64))
        t = torch.from_numpy(np.stack(rows))  # (b, L + 1)
        return t[:, :-1], t[:, 1:]
