"""One decode step of the whole model for one new token per sequence, with no host synchronisation.

``decode_step(model, tokens, state)`` computes what ``model(tokens[:, None], state=state).logits[:, -1]``
computes, but skips the input checks (they read token ids on the host) and, when ``fused``, runs the
Triton decode kernels. ``StepPlan(model, state)`` is the same step with its lookups done once, for
many tokens (generation uses it). Per block:

- block entry: op ``add_rmsnorm`` (residual add + RMSNorm, one kernel on CUDA and on CPU, fused or not);
- Mamba: in_proj → ``conv_update`` (conv + silu, state shifted in place) → x_proj → dt_proj (no bias)
  → ``ssm_update`` (A = -exp(A_log), dt bias + softplus + SSM + D + silu(z) gate, state updated in
  place) → out_proj;
- MoE: ``route_top1`` (router, sigmoid, top-1 in one kernel) → ``expert_gemv`` (a few tokens: each
  reads only its expert's weights) or ``dispatch_grouped`` (many tokens); nothing read on the host.

At batch 1 that is 7 kernels per Mamba layer and 4 per MoE layer.

So the step can be captured in a CUDA graph (``cuda_graphs``). Unfused, it calls the layers' own
paths and matches the model call exactly (the fused one matches it to rounding). It does not advance
``state.seqlen``, and MoE layers do not record ``last_stats``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers.mlp import ACTIVATIONS, GatedMLP
from .layers.moe import MoE, dispatch_sorted
from .ops.gpu import triton_available
from .ops.grouped_moe import dispatch_grouped, grouped_mm_supported
from .ops import backend as _backend

GEMV_MAX_TOKENS = 16  # up to this many tokens per MoE layer, each token streams its expert's weights


def mamba_step(mixer, h: torch.Tensor, state, fused: bool) -> torch.Tensor:
    """h (b, H) → (b, H); updates ``state`` (conv (b, I, K-1), ssm (b, I, N)) in place."""
    if not fused:
        return mixer.step(h, state)
    from .ops.triton_step import conv_update, ssm_update

    I, N, R = mixer.d_inner, mixer.state_size, mixer.dt_rank
    x, z = mixer.in_proj(h).split([I, I], dim=-1)  # (b, I) each
    x = conv_update(x, mixer.conv1d.weight[:, 0], mixer.conv1d.bias, state.conv, silu=True)
    dt, B, C = mixer.x_proj(x).split([R, N, N], dim=-1)
    dt = F.linear(dt, mixer.dt_proj.weight)  # (b, I); bias and softplus inside the kernel, in fp32
    y = ssm_update(state.ssm, x, dt, mixer.A_log, B, C, mixer.D, z, dt_bias=mixer.dt_proj.bias, softplus=True,
                   a_is_log=True)
    return mixer.out_proj(y)


def moe_step(moe, h: torch.Tensor, fused: bool) -> torch.Tensor:
    """h (T, H) → (T, H), inference routing (argmax of the router)."""
    if not fused:
        return moe(h.unsqueeze(1))[:, 0]
    from .ops.triton_moe import expert_gemv, route_top1

    gate, idx = route_top1(h, moe.router)  # (T,), (T,)
    if h.shape[0] <= GEMV_MAX_TOKENS:
        return expert_gemv(h, idx, gate, moe.local_experts)
    dispatch = dispatch_grouped if grouped_mm_supported(h) else dispatch_sorted
    return dispatch(h, idx, moe.local_experts) * gate[:, None].to(h.dtype)


def default_fused(device: torch.device) -> bool:
    return device.type == "cuda" and triton_available()


class StepPlan:
    """``decode_step`` for one model and state, with what stays fixed from token to token looked up once:
    each op's backend, each layer's weights and state tensors, the fused-or-not choice, and on CPU
    (``bind``) the kernels' arguments on preallocated buffers. Generation builds one per call (the
    weights cannot change while it runs). At batch 1 on CPU the Python dispatch this skips (module
    attribute lookups, backend resolution, argument checks, allocations: ~100 us a layer here) was
    over a tenth of a token's time."""

    def __init__(self, model, state, fused: bool | None = None, bind: bool = True):
        if model.training:
            raise RuntimeError("decode_step runs the inference path: call model.eval() first")
        device = model.device
        self.fused = default_fused(device) if fused is None else fused
        self.norm_backend, self.norm = _backend.resolve("add_rmsnorm", device)
        self.linear = _backend.resolve("linear", device)[1]
        self.residual_fp32 = model.config.residual_in_fp32
        self.embedding = model.embedding.word_embeddings.weight
        self.final_norm = model.decoder.final_layernorm
        self.head = self.embedding if model.output_layer is None else model.output_layer.weight
        self.layers = [(blk.norm.weight, blk.norm.eps, self._mixer(blk, st, device))
                       for blk, st in zip(model.decoder.layers, state.layers)]
        cpu = device.type == "cpu" and not self.fused
        self.bound = self._bind_cpu(model, state, device) if bind and cpu else None

    def _bind_cpu(self, model, state, device) -> list | None:
        """On CPU: the layers as calls on fixed buffers (h → norm → mixer → h), the kernels' arguments
        bound once (``ops.cpu.bind_*``), so a Mamba layer costs two ctypes calls a token and no tensor
        allocations, and an MoE layer at batch 1 three gemv calls and a few small ops (``_bind_moe``);
        other mixers run as usual, their output copied into the buffer. None if the
        kernels do not take this model (then the step runs op by op)."""
        from .ops import cpu

        dtype = self.embedding.dtype
        if self.norm_backend != "cpu" or any(blk.norm.weight.dtype != dtype for blk in model.decoder.layers):
            return None
        b, H = state.batch_size, self.embedding.shape[1]
        self.h = torch.empty(b, H, dtype=dtype)  # the residual stream's input to each block, then its output
        self.normed = torch.empty(b, H, dtype=dtype)
        self.residual = torch.empty(b, H, dtype=torch.float32 if self.residual_fp32 else dtype)
        step_name, _ = _backend.resolve("mamba_step", device)
        calls = []
        for i, ((weight, eps, mix), blk, st) in enumerate(zip(self.layers, model.decoder.layers, state.layers)):
            norm = cpu.bind_add_rmsnorm(self.h, None if i == 0 else self.residual, weight, eps, self.normed,
                                        self.residual)
            if norm is None:
                return None
            step = None
            if blk.kind == "mamba" and step_name == "cpu":
                args = blk.mixer.step_args(st)
                step = cpu.bind_mamba_step(self.normed, self.h, *args) if args is not None else None
            elif blk.kind == "moe" and b == 1:
                step = self._bind_moe(blk.mixer)
            calls.append(norm)
            calls.append(step or (lambda mix=mix: self.h.copy_(mix(self.normed))))
        return calls

    def _bind_moe(self, moe) -> Callable[[], None] | None:
        """One token through an MoE layer (normed → h) as ``MoE.forward`` computes it: router, sigmoid,
        top-1, the chosen expert's gated MLP, times the gate. Its three gemvs run on bound buffers, and
        only the expert index is read on the host; the module path spends ~300 us a layer on Python.
        Casts to the model's dtype where op ``linear`` casts, so the result is bit-identical. None unless
        the layer is a plain ``MoE`` of ``GatedMLP`` experts with plain bfloat16 ``nn.Linear`` weights."""
        from .ops import cpu

        x, dt = self.normed, self.normed.dtype
        linears = [moe.router] + [lin for ex in moe.local_experts for lin in (ex.linear_fc1, ex.linear_fc2)]
        if (type(moe) is not MoE or any(type(ex) is not GatedMLP for ex in moe.local_experts)
                or any(type(lin) is not nn.Linear for lin in linears) or dt not in (torch.float32, torch.bfloat16)):
            return None
        H, F2 = x.shape[1], moe.local_experts[0].linear_fc1.out_features
        xf = x if dt == torch.float32 else torch.empty(1, H)  # op `linear` reads x as float32
        logits, y1 = torch.empty(1, moe.num_experts), torch.empty(1, F2)  # float32, as op `linear` computes
        gf, y2 = torch.empty(1, F2 // 2), torch.empty(1, H)
        router = cpu.bind_gemv(xf, moe.router.weight, moe.router.bias, logits)
        experts = [(cpu.bind_gemv(xf, ex.linear_fc1.weight, None, y1),
                    cpu.bind_gemv(gf, ex.linear_fc2.weight, None, y2), ACTIVATIONS[ex.activation])
                   for ex in moe.local_experts]
        if router is None or any(fc1 is None or fc2 is None for fc1, fc2, _ in experts):
            return None
        out = self.h

        def step():
            if xf is not x:
                xf.copy_(x)
            router()
            gate, idx = torch.sigmoid(logits.to(dt)).max(dim=1, keepdim=True)  # MoE.route, inference
            fc1, fc2, act = experts[int(idx[0, 0])]
            fc1()
            a, b = y1.to(dt).chunk(2, dim=-1)  # GatedMLP.forward
            gf.copy_(act(a) * b)
            fc2()
            torch.mul(y2.to(dt), gate.to(dt), out=out)

        return step

    def _mixer(self, blk, st, device) -> Callable[[torch.Tensor], torch.Tensor]:
        """h (b, H) → (b, H) for one block's mixer, updating its state in place."""
        mixer, fused = blk.mixer, self.fused
        if blk.kind == "mamba":
            args = None if fused else mixer.step_args(st)
            if args is not None:  # what mixer.step would call, bound now
                fn = _backend.resolve("mamba_step", device)[1]
                return lambda h: fn(h, *args)
            return lambda h: mamba_step(mixer, h, st, fused)
        if blk.kind == "moe":
            return lambda h: moe_step(mixer, h, fused)
        return lambda h: mixer(h.unsqueeze(1), state=st)[:, 0]  # dense MLP, attention: their own token path

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b,) → next-token logits (b, V); consumes the tokens into the state in place."""
        if self.bound is not None and tokens.shape == self.h.shape[:1]:
            torch.index_select(self.embedding, 0, tokens, out=self.h)  # = F.embedding
            for call in self.bound:
                call()
            h, residual = self.h, self.residual
        else:
            h = F.embedding(tokens, self.embedding)  # (b, H)
            residual = None
            for weight, eps, mix in self.layers:
                h, residual = self.norm(h, residual, weight, eps, torch.float32 if self.residual_fp32 else h.dtype)
                h = mix(h)
        residual = h + residual
        fn = self.final_norm
        h = fn(residual.to(fn.weight.dtype))
        return self.linear(h, self.head, None)  # op `linear`: on CPU, bfloat16 weights are read by a gemv kernel


def decode_step(model, tokens: torch.Tensor, state, fused: bool | None = None) -> torch.Tensor:
    """tokens (b,) → next-token logits (b, V); consumes the tokens into ``state`` in place. (For many
    tokens, build a ``StepPlan`` once: this one skips its CPU buffer binding, which pays off only then.)"""
    return StepPlan(model, state, fused, bind=False)(tokens)
