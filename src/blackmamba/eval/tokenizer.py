"""Loading the tokenizer that goes with a model: a ``tokenizer.json`` (Hugging Face ``tokenizers``).

Checkpoints written by ``blackmamba train`` carry their ``tokenizer.json``; the released weights do not
(their tokenizer is GPT-NeoX-20B's: ``--tokenizer EleutherAI/gpt-neox-20b``).
"""

from __future__ import annotations

import re
from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"
# special tokens that can stand before a text's first token (end-of-text first, as in GPT-style training)
_PREFIX_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<s>", "<bos>", "<|begin_of_text|>")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def load_tokenizer(model: str | Path, path: str | Path | None = None):
    """``path`` — a tokenizer.json, a folder holding one, or a hub id — else the model folder's tokenizer.json."""
    from tokenizers import Tokenizer

    where = Path(str(path if path is not None else model)).expanduser()
    file = where / TOKENIZER_FILE if where.is_dir() else where
    if file.is_file():
        try:
            return Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exceptions for malformed files
            raise ValueError(f"{file}: not a tokenizers tokenizer.json ({e})") from None
    if path is not None and not where.exists() and _HUB_ID.match(str(path)):
        try:
            return Tokenizer.from_pretrained(str(path))
        except Exception as e:
            raise ValueError(f"could not fetch the tokenizer {path!r} from the Hugging Face hub: {e}") from None
    if path is None:
        raise FileNotFoundError(f"{model}: no {TOKENIZER_FILE} next to the model; give the tokenizer with "
                                f"--tokenizer PATH (the released BlackMamba uses EleutherAI/gpt-neox-20b)")
    raise FileNotFoundError(f"{file}: no such tokenizer file")


def prefix_token_id(tokenizer) -> int | None:
    """The special token to put before a text so that its first token is scored too (end-of-text or BOS)."""
    special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    for name in _PREFIX_TOKENS:
        if name in special:
            return special[name]
    return next(iter(special.values())) if len(special) == 1 else None
