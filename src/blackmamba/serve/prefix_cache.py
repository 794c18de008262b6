"""``PrefixCache``: snapshots of the recurrent state after a prompt's prefix, found by the prefix's tokens.

A Mamba state is the same few hundred KB whatever the context, so a server can keep many: the engine stores one
at every multiple of ``block`` tokens while it prefills a prompt and one at the prompt's end (where the next turn
of a chat resumes). A prompt that extends a stored prefix is prefilled from the snapshot, and only the rest of
its tokens are computed.

    cache = PrefixCache(budget_bytes=512 << 20)
    cache.store(tokens[:256], state)          # a copy of the state (one row) after those tokens
    cache.store(tokens, state, logits)        # ... and, at a prompt's end, the next token's logits (V,)
    n, state, logits = cache.lookup(tokens)   # the longest stored prefix: a copy of its state, its logits
                                              # (0, None, None when there is none)

Keys are a BLAKE2b digest of the prefix's token ids (a hash chain: the digest of a longer prefix continues the
shorter one's, so one pass over the prompt tests every candidate length). The next token's logits come from
the last prompt token, so a prefix as long as the whole prompt is only used if its logits were stored with it
(a prompt sent again needs no prefill at all); otherwise at least one token is left to compute. Entries are
evicted least recently used first once their bytes exceed the budget. One thread (the engine's) uses a cache.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict

import numpy as np
import torch

from ..state import State


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = 256):
        if budget_bytes < 0 or block < 1:
            raise ValueError(f"PrefixCache: budget_bytes ({budget_bytes}) must be >= 0 and block ({block}) >= 1")
        self.budget = budget_bytes
        self.block = block
        # digest → (length, state, logits or None, bytes), least recently used first
        self.entries: OrderedDict[bytes, tuple[int, State, torch.Tensor | None, int]] = OrderedDict()
        self.lengths: Counter[int] = Counter()  # prefix lengths present
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    @staticmethod
    def _digests(tokens, lengths) -> dict[int, bytes]:
        """The key of ``tokens[:n]`` for each n in ``lengths``, in one pass."""
        h = hashlib.blake2b(digest_size=16)
        data = np.asarray(tokens, dtype=np.int64)
        out, done = {}, 0
        for n in sorted(set(lengths)):
            h.update(data[done:n].tobytes())
            done = n
            out[n] = h.copy().digest()
        return out

    def store(self, prefix, state: State, logits: torch.Tensor | None = None) -> bool:
        """Keep a copy of ``state`` (one row: the state after ``prefix``) and of ``logits`` (the next token's, (V,));
        False if it is already there (with logits, if given) or larger than the whole budget."""
        key = self._digests(prefix, [len(prefix)])[len(prefix)]
        old = self.entries.get(key)
        if old is not None and (logits is None or old[2] is not None):
            self.entries.move_to_end(key)
            return False
        size = state.nbytes() + (logits.numel() * logits.element_size() if logits is not None else 0)
        if size > self.budget:
            return False
        if old is not None:
            self._drop(key)
        self.entries[key] = (len(prefix), state.clone(), None if logits is None else logits.clone(), size)
        self.lengths[len(prefix)] += 1
        self.nbytes += size
        while self.nbytes > self.budget:
            self._drop(next(iter(self.entries)))
        return True

    def _drop(self, key: bytes) -> None:
        n, _, _, size = self.entries.pop(key)
        self.nbytes -= size
        self.lengths[n] -= 1
        if not self.lengths[n]:
            del self.lengths[n]

    def lookup(self, tokens) -> tuple[int, State | None, torch.Tensor | None]:
        """(n, a copy of the state after ``tokens[:n]``, the logits after it or None) for the longest stored prefix
        that leaves nothing to compute but what the next token needs (see the module docstring), else
        (0, None, None). Counts a hit or a miss."""
        candidates = [n for n in self.lengths if 0 < n <= len(tokens)]
        for n, key in sorted(self._digests(tokens, candidates).items(), reverse=True):
            entry = self.entries.get(key)
            if entry is not None and (n < len(tokens) or entry[2] is not None):
                self.entries.move_to_end(key)
                self.hits += 1
                return n, entry[1].clone(), entry[2]
        self.misses += 1
        return 0, None, None
