"""From a corpus to what training reads: the tokenizer and the memmapped train/val token files.

Both are cached under ``$BLACKMAMBA_CACHE`` and reused by later runs: the trained BPE is keyed by the
corpus and the vocabulary size, the token files by the corpus and the tokenizer's sha256.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .corpus import Corpus, cache_dir
from .dataset import TokenFile, open_or_write
from .tokenizer import TOKENIZER_NAME, TextTokenizer, load_tokenizer, train_bpe


@dataclass
class PreparedData:
    tokenizer: TextTokenizer
    train: TokenFile
    val: TokenFile


def _key(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def bpe_for(corpus: Corpus, vocab_size: int, cache: Path | None = None) -> TextTokenizer:
    """The byte-level BPE of ``vocab_size`` trained on the corpus' training split (cached)."""
    path = (cache or cache_dir()) / "tokenizers" / _key("bpe-v1", str(vocab_size), corpus.fingerprint()) / TOKENIZER_NAME
    if path.is_file():
        return load_tokenizer(path)
    tok = train_bpe((d.text for d in corpus.train), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok


def prepare_data(corpus: Corpus, *, vocab_size: int = 2048, tokenizer: TextTokenizer | str | None = None,
                 cache: Path | None = None) -> PreparedData:
    """``tokenizer``: a tokenizer, a tokenizer.json path / hub id, or None to train (or reuse) a BPE."""
    if tokenizer is None:
        tok = bpe_for(corpus, vocab_size, cache)
    elif isinstance(tokenizer, TextTokenizer):
        tok = tokenizer
    else:
        tok = load_tokenizer(tokenizer)
    fp, tsha = corpus.fingerprint(), tok.sha256()
    directory = (cache or cache_dir()) / "tokens" / _key(fp, tsha)
    key = {"corpus_sha256": fp, "tokenizer_sha256": tsha}
    train = open_or_write(directory / "train.bin", corpus.train, tok, {**key, "split": "train"})
    val = open_or_write(directory / "val.bin", corpus.val, tok, {**key, "split": "val"})
    return PreparedData(tok, train, val)
