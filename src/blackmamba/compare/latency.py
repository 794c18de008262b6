"""Decode latency per token against the context, and prefill time against the length, for several models at once.

Both at batch 1, fp32, on this machine, as inference runs them:

- decode at context c: the model's state after a prefill of c tokens (an attention layer's keys and values, a
  Mamba layer's conv and SSM state), then a few untimed steps and ``steps`` timed calls of ``model.step`` with
  the weights bound once (``model.bind_step()``, what ``generation.Stepper`` does off CUDA); ms per token =
  their time / ``steps``.
- prefill of length L: one ``model(ids, state=...)`` forward of L tokens keeping only the last position's logits
  (what a generation's prefill computes).

The machine's speed drifts by tens of percent within seconds when it is shared, so the models are measured
interleaved: each repetition visits every (context, model) pair, the models in a rotated order, and a number is
the median over the repetitions. A drift then hits every model alike instead of whichever happened to run during
it.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _prefilled(model, context: int, generator: torch.Generator):
    """A batch-1 state after ``context`` random tokens, prefilled in chunks (an attention layer's scores stay
    (chunk × context) instead of (context × context))."""
    state = model.new_state(1)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=generator)
    for start in range(0, context, 2048):
        model(ids[:, start:start + 2048], state=state, logits_to_keep=1)
    return state


def _decode_ms(step, model, base_state, steps: int, generator: torch.Generator, warmup: int = 8) -> float:
    """ms per token of ``steps`` decode steps from a copy of ``base_state``, after ``warmup`` untimed ones: the
    model measured before this one (another's KV cache of thousands of tokens) may have evicted this one's
    weights from the caches, and a MoE step touches only the experts its token picks, so one step does not
    bring them all back."""
    state = base_state.clone()
    tokens = torch.randint(0, model.config.vocab_size, (warmup + steps, 1), generator=generator)
    for i in range(warmup):
        step(tokens[i], state)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(tokens[i], state)
    return (time.perf_counter() - t0) / steps * 1e3


def _prefill_ms(model, length: int, generator: torch.Generator) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator)
    state = model.new_state(1)
    t0 = time.perf_counter()
    model(ids, state=state, logits_to_keep=1)
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def measure_latency(models: dict, contexts: list[int], reps: int = 5, steps: int = 32, seed: int = 0,
                    log: Callable[[str], None] = lambda msg: None) -> dict[str, dict]:
    """For each model (name → BlackMambaLM in eval mode): ``{"decode_ms_per_token": {"<c>": ms},
    "prefill_ms": {"<c>": ms}}`` at every context / length in ``contexts``, the medians over ``reps``
    interleaved repetitions (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    names = list(models)
    steps_of = {n: models[n].bind_step() for n in names}
    decode = {n: {c: [] for c in contexts} for n in names}
    prefill = {n: {c: [] for c in contexts} for n in names}
    log(f"latency: prefilling {', '.join(map(str, contexts))} tokens into each model's state")
    states = {(n, c): _prefilled(models[n], c, g) for n in names for c in contexts}  # each repetition decodes a copy
    for n in names:  # warm up: the first calls of a shape allocate and, on CPU, pick kernels
        for c in contexts:
            _decode_ms(steps_of[n], models[n], states[n, c], 2, g)
            _prefill_ms(models[n], c, g)
    for rep in range(reps):
        log(f"latency: repetition {rep + 1}/{reps}")
        for c in contexts:
            for n in names[rep % len(names):] + names[:rep % len(names)]:
                decode[n][c].append(_decode_ms(steps_of[n], models[n], states[n, c], steps, g))
                prefill[n][c].append(_prefill_ms(models[n], c, g))
    return {n: {"decode_ms_per_token": {str(c): round(statistics.median(decode[n][c]), 4) for c in contexts},
                "prefill_ms": {str(c): round(statistics.median(prefill[n][c]), 3) for c in contexts}}
            for n in names}


def growth(curve: dict[str, float]) -> float:
    """Latency at the longest context / at the shortest (1.0: flat)."""
    keys = sorted(curve, key=int)
    return curve[keys[-1]] / curve[keys[0]]
