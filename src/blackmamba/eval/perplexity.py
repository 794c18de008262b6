"""Perplexity and bits per byte of a text under a model.

Every token is scored given everything before it:

- carried state (default): the text flows through the recurrent state in chunks, so each token sees the
  whole text before it — exact, O(length), memory independent of the length;
- sliding window (``window``, ``stride``): each window of ``window`` tokens starts from a fresh state and
  scores only its last ``stride`` tokens (the first window scores all of its tokens), which bounds the
  context as for a transformer with a fixed context length.

The first token is scored after the tokenizer's end-of-text (or BOS) token; a tokenizer without one leaves
the first token unscored and its bytes out of the byte count.
Log-probabilities are over the tokenizer's vocabulary (``config.vocab_size``): padded embedding rows are
never tokens. Bits per byte = total NLL (nats) / ln 2 / UTF-8 bytes of the scored text.

The text is encoded in pieces and only its ids are kept (``textstream``: exactly the ids of the whole
text), so a long text costs 12 bytes a token (the ids, then the int64 stream) rather than the hundreds a
whole-text ``Encoding`` takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .textstream import PIECE_CHARS, encode_text
from .tokenizer import prefix_token_id


@dataclass
class TextScore:
    nll: float  # total negative log-likelihood, nats
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the scored text

    @property
    def nll_per_token(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "bytes": self.bytes, "nll": self.nll, "nll_per_token": self.nll_per_token,
                "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def _nll(model, inputs: torch.Tensor, targets: torch.Tensor, state=None) -> float:
    """Sum of -log p(targets[i] | ..., inputs[i]) for one sequence, (l,) each."""
    logits = model(inputs[None].to(model.device), state=state).logits[0, :, : model.config.vocab_size]
    return _sum_nll(logits, targets)


def _sum_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    # float64: sums over long texts stay exact to well below 1e-5 nats
    return F.cross_entropy(logits.double(), targets.to(logits.device), reduction="sum").item()


@torch.no_grad()
def score_tokens(model, tokens, *, prefix: int | None, window: int | None = None, stride: int | None = None,
                 chunk: int = 1024, progress: bool = False) -> tuple[float, int]:
    """(total NLL in nats, tokens scored) of ``tokens`` (a sequence or array of ids) after ``prefix``
    (``None``: the first token is context).

    ``window`` / ``stride``: sliding windows (``stride`` defaults to half the window); otherwise the state is
    carried through the whole sequence, ``chunk`` tokens at a time.
    """
    from tqdm import tqdm

    tokens = np.asarray(tokens)
    stream = np.empty(len(tokens) + (prefix is not None), dtype=np.int64)  # one copy, 8 bytes a token
    stream[len(stream) - len(tokens):] = tokens
    if prefix is not None:
        stream[0] = prefix
    stream = torch.from_numpy(stream)
    if len(stream) < 2:
        raise ValueError("nothing to score: the text has no token after its first")
    inputs, targets = stream[:-1], stream[1:]
    n = len(targets)
    if window is not None:
        stride = stride if stride is not None else max(1, window // 2)
        if window < 1 or not 1 <= stride <= window:
            raise ValueError(f"need window >= 1 and 1 <= stride <= window, got window={window}, stride={stride}")
    elif chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with tqdm(total=n, unit="tok", desc="scoring", disable=not progress) as bar:
            if window is None:
                state = model.new_state(1)
                for start in range(0, n, chunk):
                    total += _nll(model, inputs[start:start + chunk], targets[start:start + chunk], state)
                    bar.update(min(chunk, n - start))
            else:
                scored = 0  # targets[:scored] are done
                for start in range(0, n, stride):
                    end = min(start + window, n)
                    logits_from = scored - start  # score only targets not scored by an earlier window
                    x, y = inputs[start:end], targets[start:end]
                    logits = model(x[None].to(model.device)).logits[0, logits_from:, : model.config.vocab_size]
                    total += _sum_nll(logits, y[logits_from:])
                    bar.update(end - scored)
                    scored = end
                    if end == n:
                        break
    finally:
        model.train(was_training)
    return total, n


def score_text(model, tokenizer, text: str | Iterable[str], *, window: int | None = None,
               stride: int | None = None, chunk: int = 1024, progress: bool = False,
               piece_chars: int = PIECE_CHARS) -> TextScore:
    """Score ``text`` (a string, or the consecutive chunks of one, e.g. ``read_text_chunks(path)``) that a
    ``tokenizers.Tokenizer`` encodes; see the module docstring. The ids are exactly those of encoding the
    whole text at once, computed in pieces of about ``piece_chars`` characters where that is exact
    (``textstream``), so memory does not grow with the text beyond its ids."""
    enc = encode_text(tokenizer, text, piece_chars)
    if not len(enc.ids):
        raise ValueError("nothing to score: the text is empty")
    prefix = prefix_token_id(tokenizer)
    nll, n = score_tokens(model, enc.ids, prefix=prefix, window=window, stride=stride, chunk=chunk,
                          progress=progress)
    return TextScore(nll=nll, tokens=n, bytes=enc.bytes - (enc.first_token_bytes if prefix is None else 0))
