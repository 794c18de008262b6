"""CUDA-graph decode: the single-token step captured once per batch size and replayed per token.

At batch 1 a decode step is a few hundred small kernels; launching them from Python costs more than
running them. ``GraphedDecode`` owns a preallocated recurrent state and a token buffer, captures
``decode.decode_step`` (fused Triton kernels, no host synchronisation) into a ``torch.cuda.CUDAGraph``,
and then each step is: copy the tokens in, replay, read the logits. Replays run exactly the kernels
the eager ``decode_step`` runs, so greedy output is the same.

``decode_stepper(model, batch_size)`` is what generation uses: on CUDA (and with Triton, and a model of
Mamba / MoE / MLP layers) it returns the graphed step, cached on the model per batch size and
recaptured when a weight is replaced; elsewhere, with ``BLACKMAMBA_CUDA_GRAPHS=0``, or if the capture
fails (logged as a warning), the eager step (``decode.StepPlan``). The returned logits buffer is overwritten by the
next step.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from .decode import StepPlan, decode_step
from .ops.gpu import triton_available

log = logging.getLogger("blackmamba")

GRAPHABLE_KINDS = ("mamba", "moe", "mlp")  # attention's KV cache grows, so its step has no fixed shape


class GraphedDecode:
    """The decode step of ``model`` for ``batch_size`` sequences, captured in a CUDA graph."""

    def __init__(self, model, batch_size: int, warmup: int = 2):
        device = model.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {device}")
        kinds = {blk.kind for blk in model.decoder.layers}
        if not kinds <= set(GRAPHABLE_KINDS):
            raise ValueError(f"CUDA-graph decode supports layers {GRAPHABLE_KINDS}, the model has {sorted(kinds)}")
        self.state = model.new_state(batch_size)
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        with torch.cuda.device(device):
            # warm up on a side stream: compiles the Triton kernels, creates cuBLAS handles and the MoE
            # address tables, none of which may happen during capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    decode_step(model, self.tokens, self.state, fused=True)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = decode_step(model, self.tokens, self.state, fused=True)  # (b, V), static
        self.reset()

    def reset(self):
        """Zero the state (a new batch of sequences) and return it, for the prefill to fill in place."""
        for layer in self.state.layers:
            if layer is not None:
                for t in vars(layer).values():
                    if torch.is_tensor(t):
                        t.zero_()
        self.state.seqlen = 0
        return self.state

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b,) → logits (b, V) (a static buffer, valid until the next call)."""
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.state.seqlen += 1
        return self.logits


def graphs_enabled(model) -> bool:
    if os.environ.get("BLACKMAMBA_CUDA_GRAPHS", "1").strip() == "0":
        return False
    return (model.device.type == "cuda" and triton_available()
            and all(blk.kind in GRAPHABLE_KINDS for blk in model.decoder.layers))


def _weights_key(model) -> tuple:
    return tuple((p.data_ptr(), p.dtype) for p in model.parameters())


def graphed_decode(model, batch_size: int) -> GraphedDecode | None:
    """The cached ``GraphedDecode`` of ``model`` for ``batch_size``, recaptured if a weight was replaced;
    None if the capture failed (logged once per weights and batch size)."""
    cache = model.__dict__.setdefault("_graphed_decode", {})
    key = _weights_key(model)
    entry = cache.get(batch_size)
    if entry is None or entry[0] != key:
        cache.pop(batch_size, None)
        try:
            runner = GraphedDecode(model, batch_size)
        except RuntimeError as e:  # a kernel that cannot be captured: decode eagerly rather than fail
            log.warning("blackmamba: CUDA-graph capture failed (%s); decoding without a graph", e)
            runner = None
        cache[batch_size] = (key, runner)
    return cache[batch_size][1]


def decode_stepper(model, batch_size: int) -> tuple[object, Callable[[torch.Tensor], torch.Tensor]]:
    """(fresh state, step) for generation: step(tokens (b,)) → next logits (b, V), updating the state."""
    runner = graphed_decode(model, batch_size) if graphs_enabled(model) else None
    if runner is not None:
        return runner.reset(), runner
    state = model.new_state(batch_size)
    # the decode step, not the model call: the ids are the sampler's own, so the call's range check
    # (a min / max read back per token) has nothing to catch; its lookups are done once, here
    plan = StepPlan(model, state)

    def eager(tokens: torch.Tensor) -> torch.Tensor:
        logits = plan(tokens)
        state.seqlen += 1
        return logits

    return state, eager
