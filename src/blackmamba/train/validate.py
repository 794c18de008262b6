"""Validation: mean token loss and bits per byte on the held-out token file.

bits per byte = (sum of the token NLLs in nats) / ln 2 / (UTF-8 bytes of the text those tokens encode).
The held-out stream is cut into consecutive windows; window i reads tokens [iL, iL + L) and predicts
[iL + 1, iL + L + 1), so every token after the first (the leading EOS, zero bytes) is scored exactly
once and the byte count is exactly that of the validation text. Probabilities are over the tokenizer's
ids only (``config.vocab_size``), not the padded embedding rows.

With N processes each rank scores its share of every batch of windows (a rank with none runs one window
unscored, since a sharded model's forward is collective) and the sums are added over the ranks.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.dataset import ShardedTokens


@torch.no_grad()
def evaluate(model, tokens: ShardedTokens, seq_len: int, batch_size: int,
             autocast: contextlib.AbstractContextManager | None = None, world=None) -> dict:
    """{"val_loss": nats per token, "val_bpb", "val_tokens": tokens scored, "val_bytes"}; every rank of ``world``
    (a ``blackmamba.parallel.World``; None: one process) calls it and gets the same numbers."""
    was_training = model.training
    model.eval()
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    device = world.device if world is not None else model.device
    data = tokens.tokens
    n = tokens.num_tokens
    vocab = model.config.vocab_size
    starts = list(range(0, n - 1, seq_len))
    nll, scored = 0.0, 0
    try:
        for i in range(0, len(starts), batch_size):
            group = starts[i:i + batch_size]
            # windows of equal length share a batch; the last (shorter) window runs on its own
            for lens in sorted({min(seq_len, n - 1 - s) for s in group}, reverse=True):
                rows = [s for s in group if min(seq_len, n - 1 - s) == lens]
                mine = rows[rank::size]
                scored_here = bool(mine)
                rows = mine or rows[:1]
                w = torch.from_numpy(np.stack([np.asarray(data[s:s + lens + 1], dtype=np.int64) for s in rows]))
                x, y = w[:, :-1].to(device), w[:, 1:].to(device)
                with autocast or contextlib.nullcontext():
                    logits = model(x).logits[..., :vocab]  # padded embedding rows are never tokens
                if scored_here:
                    nll += float(F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1), reduction="sum"))
                    scored += y.numel()
    finally:
        model.train(was_training)
    if size > 1:
        sums = world.sum(torch.tensor([nll, float(scored)], dtype=torch.float64, device=world.comm_device)).cpu()
        nll, scored = float(sums[0]), int(sums[1])
    return {"val_loss": nll / max(scored, 1), "val_bpb": nll / math.log(2) / max(tokens.num_bytes, 1),
            "val_tokens": scored, "val_bytes": tokens.num_bytes}
