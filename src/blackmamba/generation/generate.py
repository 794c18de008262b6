"""Generation: greedy and sampled decoding from the recurrent state, streaming, padded batches.

The prompt is consumed once (prefill, O(prompt)); each new token then costs one ``model.step`` (through a
``Stepper``), whose work does not depend on the context length.

Batches of prompts of different lengths are left-padded with an ``attention_mask`` (1 = token, 0 = pad);
the mask keeps padding out of every state, so each row produces exactly what it produces alone. Sampling
options and seeds: ``blackmamba.generation.sampling``.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from .sampling import check_options, greedy, process_logits, row_generators
from .stepper import Stepper


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
        step = Stepper.for_model(model, b)  # on CUDA: a preallocated state and a CUDA-graph step
        logits = model(input_ids, state=step.state, logits_to_keep=1,
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
                nxt = greedy(scores)
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
