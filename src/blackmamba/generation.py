"""Generation: greedy and sampled decoding from the recurrent state, streaming, padded batches.

The prompt is consumed once (prefill, O(prompt)); each new token then costs one recurrent step whose
work does not depend on the context length.

Batches of prompts of different lengths are left-padded with an ``attention_mask`` (1 = token, 0 = pad);
the mask keeps padding out of every state, so each row produces exactly what it produces alone.

Sampling: every row draws from a random stream of its own. ``seed`` is an int (row i's stream is derived from
(seed, i): reproducible, and different rows never share a stream), one int per row (row i samples as it would
alone with ``seed=[seeds[i]]``: what a server gives each request), or None (independent unseeded streams).
``check_options`` is the one validation of the options, shared by the API and the ``generate`` command.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .cuda_graphs import decode_stepper


class OptionError(ValueError):
    """Invalid generation options; ``problems`` holds (option name, what is wrong) pairs, named as in the API."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{name} {why}" for name, why in problems))


def check_options(*, max_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                  repetition_penalty: float = 1.0, seed=None, batch_size: int | None = None) -> None:
    """Raise ``OptionError`` naming every invalid option (the sampling ones only matter when ``do_sample``)."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    problems = []
    if not integer(max_new_tokens) or max_new_tokens < 0:
        problems.append(("max_new_tokens", f"= {max_new_tokens!r}: must be an integer >= 0"))
    if not (number(repetition_penalty) and repetition_penalty > 0):
        problems.append(("repetition_penalty", f"= {repetition_penalty!r}: must be a number > 0 (1: off)"))
    if do_sample:
        if not (number(temperature) and temperature > 0):
            problems.append(("temperature", f"= {temperature!r}: must be a number > 0 when sampling"))
        if top_k is not None and not (integer(top_k) and top_k >= 1):
            problems.append(("top_k", f"= {top_k!r}: must be an integer >= 1"))
        if top_p is not None and not (number(top_p) and 0 < top_p <= 1):
            problems.append(("top_p", f"= {top_p!r}: must be in (0, 1]"))
        if min_p is not None and not (number(min_p) and 0 <= min_p <= 1):
            problems.append(("min_p", f"= {min_p!r}: must be in [0, 1]"))
        seeds = seed if isinstance(seed, (list, tuple)) else [seed]
        if not all(s is None or (integer(s) and s >= 0) for s in seeds) or (
                isinstance(seed, (list, tuple)) and None in seeds):
            problems.append(("seed", f"= {seed!r}: must be an integer >= 0, one per row, or None"))
        elif isinstance(seed, (list, tuple)) and batch_size is not None and len(seed) != batch_size:
            problems.append(("seed", f"has {len(seed)} entries for {batch_size} rows: give one per row"))
    if problems:
        raise OptionError(problems)


def row_generators(seed, batch_size: int, device) -> list[torch.Generator]:
    """One torch.Generator per row (see the module docstring for what ``seed`` may be)."""
    if isinstance(seed, (list, tuple)):
        seeds = [int(s) for s in seed]
    elif seed is None:  # independent rows, drawn from torch's global generator (torch.manual_seed fixes them)
        seeds = torch.randint(0, 2**62, (batch_size,)).tolist()
    else:  # (seed, row) → a seed of its own; SeedSequence spreads neighbouring seeds and rows apart
        seeds = [int(np.random.SeedSequence([int(seed), row]).generate_state(1, np.uint64)[0] >> 2)
                 for row in range(batch_size)]
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids (b, l), attention_mask (b, l))."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, L - len(p):] = 1
    return ids, mask


def process_logits(logits: torch.Tensor, *, vocab_size: int, do_sample: bool, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                   repetition_penalty: float = 1.0, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Turn raw next-token logits (b, V) into fp32 scores ready for argmax / sampling."""
    scores = logits.float().clone()
    if scores.shape[-1] > vocab_size:  # padded embedding rows are never tokens
        scores[:, vocab_size:] = float("-inf")
    if repetition_penalty != 1.0 and seen is not None:
        # CTRL-style: divide positive scores (multiply negative ones) of tokens already present
        penalised = torch.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
        scores = torch.where(seen, penalised, scores)
    if not do_sample:
        return scores
    scores = scores / temperature
    if top_k is not None and top_k > 0 and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if min_p is not None and min_p > 0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop = (cum - torch.softmax(sorted_scores, dim=-1)) >= top_p  # keep the smallest prefix reaching top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    return scores


def stream(model, input_ids: torch.Tensor, max_new_tokens: int = 32, *, do_sample: bool = False,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           min_p: float | None = None, repetition_penalty: float = 1.0, seed: int | Sequence[int] | None = None,
           eos_token_id: int | Sequence[int] | None = None, attention_mask: torch.Tensor | None = None,
           stop: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (b,), step by step.

    Rows that have finished (EOS, or ``stop(ids) -> (b,) bool`` said so) keep yielding their EOS (or the
    last token) and stop changing; the iterator ends when all rows are done or after ``max_new_tokens``.
    The options and inputs are checked here, before the first token (``OptionError`` / ValueError).
    """
    if torch.is_tensor(input_ids) and input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    check_options(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                  top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                  batch_size=input_ids.shape[0] if torch.is_tensor(input_ids) else None)
    model.check_inputs(input_ids, attention_mask)
    return _stream(model, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, min_p,
                   repetition_penalty, seed, eos_token_id, attention_mask, stop)


@torch.no_grad()
def _stream(model, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, min_p, repetition_penalty, seed,
            eos_token_id, attention_mask, stop) -> Iterator[torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        b = input_ids.shape[0]
        device = model.device
        input_ids = input_ids.to(device)
        vocab = model.config.vocab_size
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        generators = row_generators(seed, b, device) if do_sample else []
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros(b, model.config.padded_vocab_size, dtype=torch.bool, device=device)
            real = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask.to(device) == 0, -1)
            for i in range(b):
                ids = real[i][real[i] >= 0]
                seen[i, ids] = True
        state, step = decode_stepper(model, b)  # on CUDA: a preallocated state and a CUDA-graph step
        logits = model(input_ids, state=state,
                       attention_mask=attention_mask.to(device) if attention_mask is not None else None).logits[:, -1]
        done = torch.zeros(b, dtype=torch.bool, device=device)
        history = input_ids
        for _ in range(max_new_tokens):
            scores = process_logits(logits, vocab_size=vocab, do_sample=do_sample, temperature=temperature,
                                    top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                                    seen=seen)
            if do_sample:
                probs = torch.softmax(scores, dim=-1)
                nxt = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
            else:
                nxt = scores.argmax(dim=-1)
            nxt = torch.where(done, history[:, -1], nxt)
            yield nxt
            history = torch.cat([history, nxt[:, None]], dim=1)
            if seen is not None:
                seen[torch.arange(b, device=device), nxt] = True
            if eos:
                done |= torch.isin(nxt, torch.tensor(eos, device=device))
            if stop is not None:
                done |= stop(history).to(device)
            if bool(done.all()):
                return
            logits = step(nxt)
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
    """Prompt + new tokens, (b, l + n) with n <= max_new_tokens (fewer if every row stopped early).

    Options: ``do_sample`` (default greedy), ``temperature``, ``top_k``, ``top_p``, ``min_p``,
    ``repetition_penalty``, ``seed`` (an int, one per row, or None; see the module docstring), ``eos_token_id``,
    ``attention_mask`` (left padding), ``stop``. Invalid options raise ``OptionError`` (a ValueError).
    """
    if torch.is_tensor(input_ids) and input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    new = list(stream(model, input_ids, max_new_tokens, **kwargs))
    if not new:
        return input_ids.clone()
    return torch.cat([input_ids.to(new[0].device), torch.stack(new, dim=1)], dim=1)
