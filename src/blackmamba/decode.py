"""One decode step of the whole model for one new token per sequence, with no host synchronisation.

``decode_step(model, tokens, state)`` computes what ``model(tokens[:, None], state=state).logits[:, -1]``
computes, but skips the input checks (they read token ids on the host) and, when ``fused``, runs the
Triton decode kernels:

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

import torch
import torch.nn.functional as F

from .layers.moe import dispatch_sorted
from .ops.gpu import triton_available
from .ops.grouped_moe import dispatch_grouped, grouped_mm_supported
from .ops.linear import linear
from .ops.norm import add_rmsnorm

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


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, state, fused: bool | None = None) -> torch.Tensor:
    """tokens (b,) → next-token logits (b, V); consumes the tokens into ``state`` in place."""
    if fused is None:
        fused = default_fused(tokens.device)
    if model.training:
        raise RuntimeError("decode_step runs the inference path: call model.eval() first")
    h = model.embedding.word_embeddings(tokens)  # (b, H)
    residual = None
    fp32 = model.config.residual_in_fp32
    for blk, st in zip(model.decoder.layers, state.layers):
        h, residual = add_rmsnorm(h, residual, blk.norm.weight, blk.norm.eps, torch.float32 if fp32 else h.dtype)
        if blk.kind == "mamba":
            h = mamba_step(blk.mixer, h, st, fused)
        elif blk.kind == "moe":
            h = moe_step(blk.mixer, h, fused)
        else:  # dense MLP, attention: their own single-token path
            h = blk.mixer(h.unsqueeze(1), state=st)[:, 0]
    residual = h + residual
    fn = model.decoder.final_layernorm
    h = fn(residual.to(fn.weight.dtype))
    weight = model.embedding.word_embeddings.weight if model.output_layer is None else model.output_layer.weight
    return linear(h, weight)  # op `linear`: on CPU, bfloat16 weights are read directly by a gemv kernel
