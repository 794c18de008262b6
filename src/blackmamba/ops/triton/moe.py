"""Top-1 MoE for a few tokens (decode) in Triton: each token reads only its own expert's weights.

    out[t] = gate[t] · fc2_e( act(fc1_e(x[t])[:F]) ⊙ fc1_e(x[t])[F:] ),   e = expert_idx[t]

Two matrix-vector kernels (fc1 with the gated activation fused; fc2 with the gate fused). The expert
is picked on the device through a table of the experts' weight addresses, so routing needs no host
synchronisation and the kernels can be captured in a CUDA graph. Each token streams its expert's
weights once: at batch 1 this reads exactly the active parameters, the decode roofline. (Tokens that
share an expert read its weights once each; for many tokens use ``grouped_moe.dispatch_grouped``.)

Shapes: x (T, H); expert_idx (T,) int64; gate (T,); expert e: fc1 weight (2F, H), fc2 weight (H, F),
contiguous, one dtype. Inference only (no autograd).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Many small programs with wide rows: at batch 1 a layer's expert is a few MB that must all be in flight
# at once to reach the memory bandwidth. Compiled for sm_90: 55 (fc1) / 32 (fc2) registers a thread,
# so many programs fit on an SM, each with 8 KB of weight loads per iteration. Not timed on a GPU.
BLOCK_ROWS = 4  # output rows per program
BLOCK_K = 512  # reduction slice per iteration

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _fc1_kernel(x_ptr, idx_ptr, tab_ptr, out_ptr, H, F, sx_t, so_t,
                W_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, GELU: tl.constexpr, BR: tl.constexpr,
                BK: tl.constexpr):
    t = tl.program_id(0)
    offs_f = tl.program_id(1) * BR + tl.arange(0, BR)  # (BR,) rows of the gate half
    mask_f = offs_f < F
    e = tl.load(idx_ptr + t)
    w = tl.load(tab_ptr + e).to(tl.pointer_type(W_DTYPE))  # this expert's fc1 weight (2F, H)
    if ALIGNED:  # 16-byte aligned (checked on the host): lets the weight loads be vectorised
        w = tl.multiple_of(w, 16)
    acc_a = tl.zeros((BR,), dtype=tl.float32)
    acc_b = tl.zeros((BR,), dtype=tl.float32)
    for k0 in range(0, H, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < H
        xv = tl.load(x_ptr + t * sx_t + offs_k, mask=mask_k, other=0.0).to(tl.float32)  # (BK,)
        m = mask_f[:, None] & mask_k[None, :]
        wa = tl.load(w + offs_f[:, None].to(tl.int64) * H + offs_k[None, :], mask=m, other=0.0).to(tl.float32)
        wb = tl.load(w + (F + offs_f[:, None]).to(tl.int64) * H + offs_k[None, :], mask=m, other=0.0).to(tl.float32)
        acc_a += tl.sum(wa * xv[None, :], axis=1)
        acc_b += tl.sum(wb * xv[None, :], axis=1)
    if GELU:
        act = 0.5 * acc_a * (1.0 + tl.erf(acc_a * 0.7071067811865476))
    else:
        act = acc_a * tl.sigmoid(acc_a)
    tl.store(out_ptr + t * so_t + offs_f, (act * acc_b).to(out_ptr.dtype.element_ty), mask=mask_f)


@triton.jit
def _fc2_kernel(a_ptr, idx_ptr, gate_ptr, tab_ptr, out_ptr, H, F, sa_t, so_t,
                W_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BR + tl.arange(0, BR)  # (BR,) output rows
    mask_h = offs_h < H
    e = tl.load(idx_ptr + t)
    w = tl.load(tab_ptr + e).to(tl.pointer_type(W_DTYPE))  # this expert's fc2 weight (H, F)
    if ALIGNED:
        w = tl.multiple_of(w, 16)
    acc = tl.zeros((BR,), dtype=tl.float32)
    for k0 in range(0, F, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < F
        av = tl.load(a_ptr + t * sa_t + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        wv = tl.load(w + offs_h[:, None].to(tl.int64) * F + offs_k[None, :],
                     mask=mask_h[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(wv * av[None, :], axis=1)
    acc *= tl.load(gate_ptr + t).to(tl.float32)
    tl.store(out_ptr + t * so_t + offs_h, acc.to(out_ptr.dtype.element_ty), mask=mask_h)


@triton.jit
def _router_kernel(x_ptr, w_ptr, b_ptr, gate_ptr, idx_ptr, H, E, sx_t, sw_e,
                   BE: tl.constexpr, BK: tl.constexpr):
    # logits = x·Wᵀ + b (rounded to x's dtype, as nn.Linear returns them), gate = max sigmoid, its index
    t = tl.program_id(0)
    offs_e = tl.arange(0, BE)
    mask_e = offs_e < E
    acc = tl.zeros((BE,), dtype=tl.float32)
    for k0 in range(0, H, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < H
        xv = tl.load(x_ptr + t * sx_t + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_e[:, None] * sw_e + offs_k[None, :], mask=mask_e[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)
    acc += tl.load(b_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    logits = acc.to(gate_ptr.dtype.element_ty).to(tl.float32)
    probs = tl.sigmoid(logits).to(gate_ptr.dtype.element_ty).to(tl.float32)
    probs = tl.where(mask_e, probs, -1.0)
    gate, idx = tl.max(probs, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(gate_ptr + t, gate.to(gate_ptr.dtype.element_ty))
    tl.store(idx_ptr + t, idx.to(tl.int64))


def route_top1(x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference routing in one kernel: (gate (T,) in x's dtype, expert index (T,) int64) = max / argmax of
    sigmoid(x·router_wᵀ + router_b) — ``ops.moe.route_top1`` of the router's logits."""
    T, H = x.shape
    E = router_w.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    w = router_w if router_w.stride(1) == 1 else router_w.contiguous()
    bias = router_b if router_b is not None else torch.zeros(E, dtype=w.dtype, device=w.device)
    gate = torch.empty(T, dtype=x.dtype, device=x.device)
    idx = torch.empty(T, dtype=torch.int64, device=x.device)
    with _launch_ctx(x):
        _router_kernel[(T,)](x, w, bias, gate, idx, H, E, x.stride(0), w.stride(0),
                             BE=triton.next_power_of_2(E), BK=min(triton.next_power_of_2(H), 512), num_warps=4)
    return gate, idx


def _launch_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# weight addresses → the device tables of them: kept alive here, since a captured CUDA graph reads them by address
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor, bool]] = {}


def expert_tables(fc1: list[torch.Tensor], fc2: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Device tables (E,) of the experts' fc1 / fc2 weight addresses, and whether every weight starts on a
    16-byte boundary. Built once per set of weight storages: a CUDA graph captured with them stays valid while
    the weights are updated in place."""
    key = tuple(w.data_ptr() for w in fc1 + fc2) + (fc1[0].dtype, fc1[0].device)
    if key not in _TABLES:
        if any(not w.is_contiguous() or w.dtype != fc1[0].dtype for w in fc1 + fc2):
            raise ValueError("expert weights must be contiguous and share one dtype")
        if any(w.shape != fc1[0].shape for w in fc1) or any(w.shape != fc2[0].shape for w in fc2):
            raise ValueError("all experts must have the same shapes")
        if len(_TABLES) >= 256:  # models come and go: forget the oldest
            _TABLES.pop(next(iter(_TABLES)))

        def table(ws):
            return torch.tensor([w.data_ptr() for w in ws], dtype=torch.int64, device=ws[0].device)

        _TABLES[key] = (table(fc1), table(fc2), all(w.data_ptr() % 16 == 0 for w in fc1 + fc2))
    return _TABLES[key]


def expert_gemv(x: torch.Tensor, expert_idx: torch.Tensor, gate: torch.Tensor, fc1: list[torch.Tensor],
                fc2: list[torch.Tensor], activation: str) -> torch.Tensor:
    """gate[t] · (expert expert_idx[t]'s gated MLP of x[t]) for every row: x (T, H) → (T, H) in x's dtype."""
    T, H = x.shape
    two_f, h_w = fc1[0].shape
    F = two_f // 2
    if h_w != H:
        raise ValueError(f"expert_gemv: x has {H} features, the experts take {h_w}")
    wdtype = fc1[0].dtype
    if wdtype not in _TL_DTYPE:
        raise ValueError(f"expert_gemv: unsupported weight dtype {wdtype}")
    tab1, tab2, aligned = expert_tables(list(fc1), list(fc2))
    aligned = aligned and H % 8 == 0 and F % 8 == 0  # every weight row then starts 16-byte aligned
    x = x if x.stride(1) == 1 else x.contiguous()
    idx = expert_idx.to(torch.int64).contiguous()
    a = torch.empty((T, F), dtype=x.dtype, device=x.device)
    out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    with _launch_ctx(x):
        _fc1_kernel[(T, triton.cdiv(F, BLOCK_ROWS))](
            x, idx, tab1, a, H, F, x.stride(0), a.stride(0),
            W_DTYPE=_TL_DTYPE[wdtype], ALIGNED=aligned, GELU=activation == "gelu", BR=BLOCK_ROWS, BK=BLOCK_K,
            num_warps=4)
        _fc2_kernel[(T, triton.cdiv(H, BLOCK_ROWS))](
            a, idx, gate.reshape(-1).contiguous(), tab2, out, H, F, a.stride(0), out.stride(0),
            W_DTYPE=_TL_DTYPE[wdtype], ALIGNED=aligned, BR=BLOCK_ROWS, BK=BLOCK_K, num_warps=4)
    return out
