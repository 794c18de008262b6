"""Text in, text out: prompts encoded with a tokenizer, the continuation streamed back as text.

    from blackmamba.generation import load_model_and_tokenizer, stream_text, generate_text
    model, tokenizer = load_model_and_tokenizer("runs/shakespeare")
    for piece in stream_text(model, tokenizer, "ROMEO.\\n", max_new_tokens=100, do_sample=True, seed=0):
        print(piece, end="", flush=True)
    texts = generate_text(model, tokenizer, ["ROMEO.\\n", "To be"], max_new_tokens=50)   # one padded batch

Generation ends at the tokenizer's EOS token, at the first stop string (which is not included in the
text), or after ``max_new_tokens``. Sampling options are those of ``blackmamba.generation.generate``.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .generate import pad_prompts

NEOX_VOCAB = (50277, 50304)  # GPT-NeoX-20B's ids, and the release's padded embedding rows


def load_model_and_tokenizer(spec, tokenizer: str | None = None, device: str = "auto", quantize: str | None = None,
                             group_size: int = 32):
    """(model in eval mode, TextTokenizer) for a run directory, model folder or hub id, its linear layers
    quantized with ``quantize`` ("int8" | "int4"; ``load_pretrained``). The tokenizer is ``tokenizer`` (a
    tokenizer.json, folder or hub id), else the folder's ``tokenizer.json``, else, for the release checkpoints
    (which ship none), GPT-NeoX-20B's. Problems are ValueErrors (CheckpointError, DataError) naming them.
    """
    from ..checkpoint import load_pretrained, resolve_path
    from ..data.corpus import DataError
    from ..data.tokenizer import NEOX_TOKENIZER, TOKENIZER_NAME, load_tokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: no CUDA device is available")
    directory = resolve_path(spec)
    model = load_pretrained(directory, device=device, quantize=quantize, group_size=group_size)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif (directory / TOKENIZER_NAME).is_file():
        tok = load_tokenizer(directory / TOKENIZER_NAME)
    elif model.config.vocab_size in NEOX_VOCAB:
        tok = load_tokenizer(NEOX_TOKENIZER)
    else:
        raise DataError(f"{spec}: no {TOKENIZER_NAME} next to the model; give one with --tokenizer")
    if tok.vocab_size > model.config.padded_vocab_size:
        raise DataError(f"the tokenizer ({tok.source}) has {tok.vocab_size} ids but the model only "
                        f"{model.config.padded_vocab_size} embedding rows: they do not belong together")
    return model, tok


def check_prompt(prompt) -> None:
    """ValueError unless ``prompt`` is text that UTF-8 can hold (a command line's undecodable bytes arrive as
    lone surrogates, which no tokenizer takes)."""
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt must be text (str), got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the prompt {prompt!r} is not valid UTF-8 text (at character {e.start}); "
                         f"check the terminal's encoding") from None


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids; ValueError for text that is not valid (``check_prompt``) or tokenizes to nothing."""
    check_prompt(prompt)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError(f"the prompt {prompt!r} tokenizes to nothing: give some text")
    return ids


class TextStream:
    """Token ids in, text out, incrementally: ``push(token)`` returns the text that became final — valid UTF-8
    (a character split over tokens waits for its last byte) that can no longer turn into a stop string — and
    ``finish()`` the rest. At the first stop string ``stopped`` becomes True and the text ends before it.
    Only a window of recent ids is decoded per token, so a long generation costs O(length), not O(length²)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # a tail that may still become a stop string
        self.ids: list[int] = []
        self.text = ""  # decoded so far (a character still incomplete is not in it)
        self.printed = 0  # characters of ``text`` already returned
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] decode to text's tail: the window a new id is decoded with
        self._read = 0

    def push(self, token: int) -> str:
        """Take one generated id (not EOS); the text that became final (maybe "")."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # an incomplete character waits
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back (a possible stop string's beginning, an incomplete character)."""
        if not self.stopped and self._read < len(self.ids):
            self.text += self.tokenizer.decode(self.ids[self._prefix:])[len(
                self.tokenizer.decode(self.ids[self._prefix:self._read])):]
            self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:  # a stop string can only start in the part not yet returned, or in the held tail
            hits = [i for i in (self.text.find(s, max(0, self.printed - len(s))) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.text = self.text[:min(hits)]
                final = True
        ready = len(self.text) if final else max(self.printed, len(self.text) - self.hold)
        piece = self.text[self.printed:ready]
        self.printed = max(self.printed, ready)
        return piece


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int = 200, *, stop: Sequence[str] = (),
                **sampling) -> Iterator[str]:
    """Yield the continuation of ``prompt`` piece by piece, as soon as each piece is final (``TextStream``)."""
    ids = encode_prompt(tokenizer, prompt)
    eos = tokenizer.eos_id
    text = TextStream(tokenizer, stop)
    for nxt in model.stream(torch.tensor([ids]), max_new_tokens, eos_token_id=eos, **sampling):
        t = int(nxt[0])
        if eos is not None and t == eos:
            break
        piece = text.push(t)
        if piece:
            yield piece
        if text.stopped:
            return
    piece = text.finish()
    if piece:
        yield piece


def generate_text(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 200, *,
                  stop: Sequence[str] = (), **sampling) -> list[str]:
    """The continuation of every prompt, generated together in one left-padded batch; each row comes out
    exactly as it would alone (its text and its stop strings read by a ``TextStream``, as ``stream_text``
    reads them: O(length) per row)."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    eos = tokenizer.eos_id
    ids, mask = pad_prompts(encoded, pad_id=eos if eos is not None else 0)
    L = ids.shape[1]
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    pieces: list[list[str]] = [[] for _ in prompts]
    ended = [False] * len(prompts)  # the row produced EOS: what follows is padding
    seen = 0  # generated tokens already read

    def read(history: torch.Tensor) -> torch.Tensor:  # (b, L + n) → (b,) bool: the rows a stop string ended
        nonlocal seen
        for r, new in enumerate(history[:, L + seen:].tolist()):
            for t in new:
                if ended[r] or streams[r].stopped:
                    break
                if eos is not None and t == eos:
                    ended[r] = True
                    break
                pieces[r].append(streams[r].push(t))
        seen = history.shape[1] - L
        return torch.tensor([st.stopped for st in streams])

    out = model.generate(ids, max_new_tokens, attention_mask=mask, eos_token_id=eos,
                         stop=read if stop else None, **sampling)
    read(out)
    return ["".join(pieces[r]) + streams[r].finish() for r in range(len(prompts))]
