"""``Stepper``: ``model.step`` for a batch over a recurrent state of its own, captured in a CUDA graph where it can be.

The weights each layer's step reads are bound once, when the Stepper is made (``model.bind_step()``): they cannot
change during a generation, and at batch 1 on a CPU checking them and taking their addresses for every token is a
measurable part of a step.

On a GPU a decode step at batch 1 is a few hundred small kernels; launching them from Python costs more than
running them.
On CUDA (Triton installed, no attention layers: their keys grow, so their step has no fixed shape) the Stepper
captures ``model.step`` once per batch size into a ``torch.cuda.CUDAGraph`` over a preallocated state and token
buffer, and each step is then: copy the tokens in, replay, read the logits. Replays run exactly the kernels the
eager ``model.step`` runs, so the output is the same. Elsewhere, with ``BLACKMAMBA_CUDA_GRAPHS=0``, or if the
capture fails (logged), a step is ``model.step`` itself — which on a CPU replays its block loop's kernel calls,
recorded at the second step, in one call (``ops.replayable``). The graphs are cached on the model per batch size
and captured again when a weight is replaced or changed in place.

    stepper = Stepper.for_model(model, batch_size)
    state = stepper.reset()                        # zeroed; the prefill fills it: model(ids, state=state)
    logits = stepper(tokens)                       # (b, V); a graph's logits buffer is overwritten by the next step
"""

from __future__ import annotations

import logging
import os

import torch

from ..ops.triton import available as triton_available

log = logging.getLogger("blackmamba")

GRAPHABLE_KINDS = ("mamba", "moe", "mlp")  # attention's KV cache grows, so its step has no fixed shape


def graphs_enabled(model) -> bool:
    if os.environ.get("BLACKMAMBA_CUDA_GRAPHS", "1").strip() == "0":
        return False
    return (model.device.type == "cuda" and triton_available()
            and all(blk.kind in GRAPHABLE_KINDS for blk in model.decoder.layers))


class Stepper:
    """``model.step`` over ``self.state`` (``batch_size`` rows), replayed from a CUDA graph when ``graphed``."""

    def __init__(self, model, batch_size: int, graph: bool = False, warmup: int = 2):
        self.model = model
        self.state = model.new_state(batch_size)
        self.step = model.bind_step()  # the weights, bound once: they cannot change during a generation
        self.graph = None
        if graph:
            self.tokens = torch.zeros(batch_size, dtype=torch.long, device=model.device)
            with torch.cuda.device(model.device):
                # warm up on a side stream: compiles the Triton kernels, creates cuBLAS handles and the MoE
                # address tables, none of which may happen during capture
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(warmup):
                        self.step(self.tokens, self.state)
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.logits = self.step(self.tokens, self.state)  # (b, V), static
        self.reset()

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def reset(self):
        """Zero the state (a new batch of sequences) and return it, for the prefill to fill in place."""
        self.state.reset()
        return self.state

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b,) → next-token logits (b, V), consuming the tokens into ``self.state``."""
        if self.graph is None:
            return self.step(tokens, self.state)
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.state.seqlen += 1  # the replayed step's own Python ran once, at capture
        return self.logits

    @classmethod
    def for_model(cls, model, batch_size: int) -> "Stepper":
        """A Stepper for generation: on CUDA the graph of ``model`` for ``batch_size`` (cached on the model and
        captured again if a weight was replaced or changed in place — the graph reads what ``bind_step``
        computed from the weights at capture, such as A = -exp(A_log) —, or eager if the capture failed);
        elsewhere a plain one."""
        if not graphs_enabled(model):
            return cls(model, batch_size)
        cache = model.__dict__.setdefault("_steppers", {})
        key = tuple((p.data_ptr(), p.dtype, p._version) for p in model.parameters())
        entry = cache.get(batch_size)
        if entry is None or entry[0] != key:
            try:
                stepper = cls(model, batch_size, graph=True)
            except RuntimeError as e:  # a kernel that cannot be captured: decode eagerly rather than fail
                log.warning("blackmamba: CUDA-graph capture failed (%s); decoding without a graph", e)
                stepper = cls(model, batch_size)
            cache[batch_size] = entry = (key, stepper)
        entry[1].reset()
        return entry[1]
