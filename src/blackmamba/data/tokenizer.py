"""Tokenizers: a byte-level BPE trained on the training split (seconds), or a given one (GPT-NeoX-20B's
for the release checkpoints), both as a ``tokenizers.Tokenizer`` saved as ``tokenizer.json``.

Byte-level BPE is lossless: every UTF-8 text encodes, and decoding the ids gives the text back byte
for byte, which is what bits-per-byte accounting relies on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import DataError

EOS = "<|endoftext|>"  # document separator; GPT-NeoX-20B's tokenizer has the same token
TOKENIZER_NAME = "tokenizer.json"
NEOX_TOKENIZER = "EleutherAI/gpt-neox-20b"  # the release checkpoints' tokenizer (not shipped with them)


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with what training and generation need (ids in, ids out, no extras)."""

    def __init__(self, tokenizer: Tokenizer, source: str):
        self.tokenizer = tokenizer
        self.source = source
        self.eos_id: int | None = tokenizer.token_to_id(EOS)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (added/special tokens included); embedding rows may be padded beyond it."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (in parallel threads)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, path: Path) -> None:
        """Write ``tokenizer.json`` atomically."""
        from ..files import write_bytes

        write_bytes(Path(path), self.to_json().encode())


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """A byte-level BPE with ``vocab_size`` ids (all 256 bytes + ``<|endoftext|>`` + merges) learned from ``texts``.

    The result can have fewer ids than asked for when the texts are too small to support more merges.
    """
    if vocab_size < 257:
        raise DataError(f"vocab_size = {vocab_size}: a byte-level BPE needs at least 257 ids (256 bytes + EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return TextTokenizer(tok, f"byte-level BPE ({tok.get_vocab_size()} ids)")


def load_tokenizer(spec: str | Path) -> TextTokenizer:
    """A ``tokenizer.json`` file, a folder holding one, or a hub id (``EleutherAI/gpt-neox-20b``)."""
    p = Path(str(spec)).expanduser()
    if p.is_dir():
        p = p / TOKENIZER_NAME
        if not p.is_file():
            raise DataError(f"{spec}: no {TOKENIZER_NAME} in this folder")
    if p.is_file():
        try:
            return TextTokenizer(Tokenizer.from_file(str(p)), str(p))
        except Exception as e:  # the tokenizers library raises plain Exceptions for bad JSON
            raise DataError(f"{p}: not a tokenizers JSON file ({e})") from None
    if "/" in str(spec) and not str(spec).startswith((".", "/", "~")):
        try:
            return TextTokenizer(Tokenizer.from_pretrained(str(spec)), str(spec))
        except Exception as e:  # network, auth, missing repo: one clear line
            raise DataError(f"could not fetch the tokenizer {spec!r} from the Hugging Face hub "
                            f"({type(e).__name__}); give a local tokenizer.json with --tokenizer") from None
    raise DataError(f"{spec}: no such tokenizer file or folder")
