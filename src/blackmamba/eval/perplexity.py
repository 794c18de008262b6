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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    """(total NLL in nats, tokens scored) of ``tokens`` after ``prefix`` (``None``: the first token is context).

    ``window`` / ``stride``: sliding windows (``stride`` defaults to half the window); otherwise the state is
    carried through the whole sequence, ``chunk`` tokens at a time.
    """
    from tqdm import tqdm

    stream = torch.tensor(([prefix] if prefix is not None else []) + list(tokens), dtype=torch.long)
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


def score_text(model, tokenizer, text: str, *, window: int | None = None, stride: int | None = None,
               chunk: int = 1024, progress: bool = False) -> TextScore:
    """Score ``text`` (a ``tokenizers.Tokenizer`` encodes it); see the module docstring."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    if not enc.ids:
        raise ValueError("nothing to score: the text is empty")
    prefix = prefix_token_id(tokenizer)
    nll, n = score_tokens(model, enc.ids, prefix=prefix, window=window, stride=stride, chunk=chunk,
                          progress=progress)
    scored_text = text if prefix is not None else text[enc.offsets[0][1]:]
    return TextScore(nll=nll, tokens=n, bytes=len(scored_text.encode("utf-8")))
