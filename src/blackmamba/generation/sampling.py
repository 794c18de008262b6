"""Sampling: the options, their one validation (shared by the API and the ``generate`` command), each row's
random stream, the logits processing (temperature, top-k, top-p, min-p, repetition penalty) and the greedy
choice.

``seed`` is an int (row i's stream is derived from (seed, i): reproducible, and different rows never share a
stream), one int per row (row i samples as it would alone with ``seed=[seeds[i]]``: what a server gives each
request), or None (independent unseeded streams, drawn from torch's global generator).
"""

from __future__ import annotations

import math

import numpy as np
import torch


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


def greedy(scores: torch.Tensor) -> torch.Tensor:
    """Each row's greedy token: scores (b, V) → (b,) int64, the index of the row's first maximum, a NaN counting as
    the maximum — ``scores.argmax(-1)``'s answer. On CPU through numpy's argmax (other float dtypes widened to
    float32 first, exactly), which reads a row of a 50k vocabulary several times faster than torch's
    (docs/benchmarks.md): 1-2 % of a decode step on a 2-core CPU."""
    if scores.device.type == "cpu" and scores.is_floating_point() and scores.dim() == 2 and scores.shape[1]:
        x = scores.detach()
        if x.dtype != torch.float32 and x.dtype != torch.float64:
            x = x.float()
        return torch.from_numpy(np.argmax(x.numpy(), axis=-1).astype(np.int64))
    return scores.argmax(dim=-1)


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
