"""The BlackMamba language model: embedding → N pre-norm residual blocks → final LayerNorm → tied head.

Residual stream (as released; fp32 residual):

    residual = h + residual (h for the first block)
    h = mixer(RMSNorm(residual))
    out = LayerNorm(h + residual);  logits = out @ embedding.weightᵀ

``forward`` runs sequences (b, l) — training, prefill, scoring — and ``step`` one token per row (b,) — decoding;
each block and each layer has the same two methods, so the residual loop above is written once for each, and
every computation below it goes through the ops (``blackmamba.ops``), whose backends the registry picks.

Module names equal the release checkpoint's keys (``embedding.word_embeddings``,
``decoder.layers.{i}.norm`` / ``.mixer``, ``decoder.final_layernorm``), so a release state dict loads as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import BlackMambaConfig
from .layers import Attention, GatedMLP, MambaMixer, MoE, RMSNorm
from .ops.linear import linear
from .ops.norm import bind_add_rmsnorm
from .ops import replayable
from .state import State


# The SSM parameters are kept in float32 whatever the other weights' dtype (Mamba practice; the release stores
# them so), and are not decayed by the optimizer.
SSM_PARAMETERS = ("A_log", "D")


def is_ssm_parameter(name: str) -> bool:
    """Whether the parameter called ``name`` (``decoder.layers.0.mixer.A_log``) is one of SSM_PARAMETERS."""
    return name.rsplit(".", 1)[-1] in SSM_PARAMETERS


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (b, l, padded vocab)
    loss: torch.Tensor | None = None


class Block(nn.Module):
    """One residual layer: the block entry (residual add + RMSNorm) and its mixer."""

    def __init__(self, config: BlackMambaConfig, kind: str, experts: int):
        super().__init__()
        self.kind = kind
        self.residual_dtype = torch.float32 if config.residual_in_fp32 else None  # None: the stream's dtype
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        if kind == "mamba":
            self.mixer = MambaMixer(config.hidden_size, config.state_size, config.conv_width, config.expand,
                                    config.dt_rank)
        elif kind == "moe":
            self.mixer = MoE(config.hidden_size, config.ffn_hidden_size, experts, config.mlp_activation,
                             config.router_train_mode)
        elif kind == "mlp":
            self.mixer = GatedMLP(config.hidden_size, config.ffn_hidden_size, config.mlp_activation)
        else:
            self.mixer = Attention(config.hidden_size, config.num_heads)

    def new_state(self, batch_size: int, dtype: torch.dtype, device):
        if self.kind in ("mamba", "attention"):
            return self.mixer.new_state(batch_size, dtype, device)
        return None

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, state=None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) (b, l, H) → the next block's (h, residual); ``state`` updated in place."""
        h, residual = self.norm(h, residual, self.residual_dtype)
        return self.mixer(h, state=state, mask=mask), residual

    def bind_step(self):
        """``step`` with the block's weights bound (``RMSNorm.forward``'s op ``add_rmsnorm`` and the mixer's
        ``bind_step``): a callable (h, residual, state) → the next block's (h, residual)."""
        norm = bind_add_rmsnorm(self.norm.weight, self.norm.eps, self.residual_dtype)
        mixer = self.mixer.bind_step()

        def step(h, residual, state):
            h, residual = norm(h, residual)
            return mixer(h, state), residual

        return step

    def step(self, h: torch.Tensor, residual: torch.Tensor | None, state) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row: (h, residual) (b, H) → the next block's; ``state`` updated in place."""
        return self.bind_step()(h, residual, state)


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)


class Decoder(nn.Module):
    def __init__(self, config: BlackMambaConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(config, kind, e) for kind, e in config.layer_kinds())
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=True)


class BlackMambaLM(nn.Module):
    """The language model: ``forward`` (sequences, optional state and mask), ``step`` (one token per row),
    ``new_state``, ``generate`` / ``stream``, ``save_pretrained``."""

    def __init__(self, config: BlackMambaConfig):
        super().__init__()
        self.config = config
        self.embedding = Embedding(config.padded_vocab_size, config.hidden_size)
        self.decoder = Decoder(config)
        self.output_layer = (None if config.tie_embeddings
                             else nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False))
        self.quantization = None  # set by blackmamba.quantize (the model is then for inference only)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation for training from scratch (the release's scheme)."""
        n = self.config.num_layers
        nn.init.normal_(self.embedding.word_embeddings.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            # GPT-2 scheme: scale the projections that write into the residual stream by 1/sqrt(n_layers)
            if name.endswith(("out_proj.weight", "linear_fc2.weight")):
                p.div_(math.sqrt(n))
        for module in self.modules():
            if isinstance(module, MambaMixer):
                module.reset_dt()  # dt_proj bias is not zero: log-uniform softplus(bias)
                module.A_log.copy_(torch.log(torch.arange(1, module.state_size + 1, dtype=torch.float32))
                                   .repeat(module.d_inner, 1))
                module.D.fill_(1.0)
                module.conv1d.reset_parameters()

    # ------------------------------------------------------------------ state
    @property
    def device(self) -> torch.device:
        return self.embedding.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.final_layernorm.weight.dtype  # (the embedding may be stored quantized)

    def to_dtype(self, dtype: torch.dtype) -> "BlackMambaLM":
        """Cast the weights to ``dtype`` in place, keeping the SSM parameters (A_log, D) in float32 (and a quantized
        layer's bytes and scales as they are: they are buffers)."""
        for name, p in self.named_parameters():
            p.data = p.data.float() if is_ssm_parameter(name) else p.data.to(dtype)
        return self

    def train(self, mode: bool = True) -> "BlackMambaLM":
        """``nn.Module.train``; a quantized model (``blackmamba.quantize``) refuses: it is for inference."""
        if mode and self.quantization is not None:
            raise ValueError(f"this model's weights are quantized ({self.quantization.mode}): it runs inference "
                             f"only; train or fine-tune the full-precision checkpoint")
        return super().train(mode)

    def new_state(self, batch_size: int = 1, dtype: torch.dtype | None = None, device=None) -> State:
        """Fresh recurrent state for ``batch_size`` sequences (nothing consumed yet). ``dtype``: of the conv state
        and attention keys / values (default: the model's; float32 with bfloat16 weights keeps them exact); the SSM
        state is always float32."""
        dtype = dtype or self.dtype
        device = device or self.device
        return State(layers=[blk.new_state(batch_size, dtype, device) for blk in self.decoder.layers],
                     batch_size=batch_size, seqlen=0, started=[False] * batch_size)

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     state: State | None = None) -> None:
        """ValueError naming the problem unless ``input_ids`` is a non-empty (batch, length) tensor of ids the
        vocabulary has, and ``attention_mask`` (if given) left padding of the same shape: 0s then 1s in every row,
        every row holding a token, unless ``state`` shows the row's tokens are still to come (a chunk of a long
        left padding) — a row that already consumed tokens takes no more padding."""
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, length) integer tensor, got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids has no rows: give at least one sequence")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: give at least one token per sequence")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        V = self.config.padded_vocab_size
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range: the model's vocabulary has ids 0..{V - 1}")
        if state is not None and state.batch_size != input_ids.shape[0]:
            raise ValueError(f"state was made for batch size {state.batch_size}, input has batch size "
                             f"{input_ids.shape[0]}")
        if attention_mask is None:
            return
        if not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
            shape = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
            raise ValueError(f"attention_mask shape {shape} != input_ids shape {tuple(input_ids.shape)}")
        if attention_mask.is_floating_point() or attention_mask.is_complex() or \
                not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold 0 (padding) and 1 (token), as integers or booleans")
        m = attention_mask.bool()
        holes = (m[:, :-1] & ~m[:, 1:]).any(1)
        started = torch.tensor(state.started, device=m.device) if state is not None else torch.zeros_like(holes)
        for row in (holes | (started & ~m.all(1))).nonzero().flatten().tolist():
            raise ValueError(f"attention_mask row {row} has padding after a token (a hole or right padding): "
                             f"only left padding is supported")
        empty = ~m.any(1) & ~started
        if state is None and bool(empty.any()):
            raise ValueError(f"attention_mask row {int(empty.nonzero()[0])} is all padding: every sequence needs a "
                             f"token")

    # ------------------------------------------------------------------ forward and step
    def forward(self, input_ids: torch.Tensor, state: State | None = None,
                attention_mask: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                logits_to_keep: int = 0, bound_step: Callable | None = None) -> ModelOutput:
        """input_ids (b, l) → logits (b, l, V).

        ``state``: consume the tokens from it and update it in place (chunked prefill and decode; at inference
        one token a row with a state and no padding is ``step``, or ``bound_step`` if given: ``bind_step()``'s
        callable, so that a decoding loop calling forward binds the weights once, not every token).
        ``attention_mask`` (b, l): 1 for tokens, 0 for (left) padding, which then never reaches any state.
        ``targets`` (b, l): also return the mean cross-entropy (-100 is ignored). ``logits_to_keep``
        (transformers' name): only the last n positions' logits, (b, min(n, l), V) (0: all) — a prefill needs only
        the last one, and the head is a large part of a short prompt's work.
        """
        self.check_inputs(input_ids, attention_mask, state)
        if logits_to_keep and (not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool)
                               or logits_to_keep < 0 or targets is not None):
            raise ValueError(f"logits_to_keep must be an integer >= 0, and 0 with targets; got {logits_to_keep!r}")
        b, l = input_ids.shape
        mask = attention_mask.bool() if attention_mask is not None and not bool(attention_mask.all()) else None
        if state is not None and l == 1 and mask is None and targets is None and not (
                torch.is_grad_enabled() or self.training):
            step = bound_step if bound_step is not None else self.step
            return ModelOutput(logits=step(input_ids[:, 0], state)[:, None])
        h = self.embedding.word_embeddings(input_ids.long())
        residual = None
        for i, blk in enumerate(self.decoder.layers):
            h, residual = blk(h, residual, state.layers[i] if state is not None else None, mask)
        if logits_to_keep:
            h, residual = h[:, -logits_to_keep:], residual[:, -logits_to_keep:]
        logits = self._head(h, residual)
        if state is not None:
            state.seqlen += l
            real = [True] * b if mask is None else mask.any(1).tolist()
            state.started = [a or r for a, r in zip(state.started, real)]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).long(),
                                   ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def bind_step(self) -> Callable[[torch.Tensor, State], torch.Tensor]:
        """``step`` with every layer's weights bound: a callable (tokens, state) → logits, valid while no weight
        is replaced, moved or changed — for one generation. Each layer's ops are bound once (ops/registry.py:
        Binding; on CPU the kernels' operands checked and their addresses taken), which at batch 1 on a CPU is a
        measurable part of a token; a ``Stepper`` and the serve engine bind once and step many times. On a CPU the
        block loop is also ``ops.replayable``: recorded at a state's second step and from the third made in one
        call (the same kernel calls, bit-identical; docs/kernels.md "Replay")."""
        run_blocks = replayable(self.bind_blocks())  # on a CPU, from a state's third step on: one C call
        embed, head = self.embedding.word_embeddings, self._head

        @torch.no_grad()
        def step(tokens: torch.Tensor, state: State) -> torch.Tensor:
            h, residual = run_blocks(embed(tokens), state)  # (b, H) each; overwritten by the next replay
            state.seqlen += 1
            state.started = [True] * state.batch_size  # every row consumed a real token
            return head(h, residual)

        return step

    def bind_blocks(self) -> Callable[[torch.Tensor, State], tuple[torch.Tensor, torch.Tensor]]:
        """The residual loop of ``step`` with every block's weights bound (each ``Block.bind_step``): a callable
        (h (b, H), state) → the last block's (h, residual), what ``bind_step`` runs between the embedding and the
        head (and makes ``ops.replayable``)."""
        blocks = [blk.bind_step() for blk in self.decoder.layers]

        def run_blocks(h: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor]:
            residual = None
            for blk, st in zip(blocks, state.layers):
                h, residual = blk(h, residual, st)
            return h, residual

        return run_blocks

    def step(self, tokens: torch.Tensor, state: State) -> torch.Tensor:
        """One token per row: tokens (b,) → next-token logits (b, V); consumes them into ``state`` in place.
        Binds the weights for this one call (``bind_step``: bind once to decode many tokens).

        No input checks and nothing read back on the host (a CUDA graph can capture it; ``forward`` checks);
        inference only (MoE layers route as in eval mode)."""
        return self.bind_step()(tokens, state)

    def _head(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The last block's (h, residual) → logits: out = LayerNorm(h + residual), the (tied) LM head."""
        fn = self.decoder.final_layernorm
        h = fn((h + residual).to(fn.weight.dtype))
        weight = self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight
        return linear(h, weight)  # op `linear`: on CPU a decode-sized gemv reads bf16 weights directly

    # ------------------------------------------------------------------ routing statistics and sizes
    def routing_stats(self) -> list[dict]:
        """Per MoE layer, from the last forward: layer index, tokens per expert, Sinkhorn iterations."""
        return [{"layer": i, **blk.mixer.last_stats} for i, blk in enumerate(self.decoder.layers)
                if blk.kind == "moe" and blk.mixer.last_stats is not None]

    def num_parameters(self, active: bool = False) -> int:
        """Total parameters, or those used per token (one expert per MoE layer): ``config.param_counts``."""
        return self.config.param_counts()[1 if active else 0]

    def weight_bytes(self, tokens: int = 1) -> int:
        """Bytes of the weights a decode step of ``tokens`` sequences reads: every parameter (and a quantized
        layer's bytes and scales), but of each MoE layer's experts only the ``min(tokens, experts)`` that the
        tokens can use, and of an embedding the head does not read (an untied or quantized head) only their rows."""
        def nbytes(module) -> int:
            return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))

        total = nbytes(self)
        if self.output_layer is not None:  # the embedding is read a row per token
            V = self.config.padded_vocab_size
            total -= nbytes(self.embedding) * (V - min(tokens, V)) // V
        for blk in self.decoder.layers:
            if blk.kind == "moe":
                E = blk.mixer.num_experts
                expert = nbytes(blk.mixer.local_experts[0])
                total -= expert * (E - min(E, tokens))
        return total

    # ------------------------------------------------------------------ generation and checkpoints
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Prompt + up to ``max_new_tokens`` new tokens, (b, l + n). See ``blackmamba.generation.generate``."""
        from .generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs):
        """Yield the new tokens (b,) one step at a time. See ``blackmamba.generation.stream``."""
        from .generation import stream

        return stream(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def save_pretrained(self, directory, **kwargs) -> None:
        """Write ``config.json`` + ``model.safetensors`` (atomically) to ``directory``."""
        from .checkpoint import save_pretrained

        save_pretrained(self, directory, **kwargs)
