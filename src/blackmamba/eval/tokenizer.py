"""Loading the tokenizer that goes with a model: a ``tokenizer.json`` (Hugging Face ``tokenizers``).

Checkpoints written by ``blackmamba train`` carry their ``tokenizer.json``; the released weights do not
(their tokenizer is GPT-NeoX-20B's: ``--tokenizer EleutherAI/gpt-neox-20b``).
"""

from __future__ import annotations

from pathlib import Path

# special tokens that can stand before a text's first token (end-of-text first, as in GPT-style training)
_PREFIX_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<s>", "<bos>", "<|begin_of_text|>")


def load_tokenizer(model: str | Path, path: str | Path | None = None):
    """The raw ``tokenizers.Tokenizer`` of ``path`` (a tokenizer.json, a folder holding one, or a hub id),
    else the model folder's tokenizer.json (or ``model`` itself when it is a tokenizer.json file)."""
    from ..data.tokenizer import TOKENIZER_NAME
    from ..data.tokenizer import load_tokenizer as load

    if path is None:
        path = Path(str(model)).expanduser()
        if not (path.is_file() or (path / TOKENIZER_NAME).is_file()):
            raise FileNotFoundError(f"{model}: no {TOKENIZER_NAME} next to the model; give the tokenizer with "
                                    f"--tokenizer PATH (the released BlackMamba uses EleutherAI/gpt-neox-20b)")
    return load(path).tokenizer


def prefix_token_id(tokenizer) -> int | None:
    """The special token to put before a text so that its first token is scored too (end-of-text or BOS)."""
    special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    for name in _PREFIX_TOKENS:
        if name in special:
            return special[name]
    return next(iter(special.values())) if len(special) == 1 else None
