"""The ``cpu`` backend of the decode-time ops: ``mamba_step``, ``moe_step``, ``linear`` and ``add_rmsnorm``.

Decoding a token reads every active weight once, so its speed is the memory bandwidth; these kernels
(csrc/mamba_step.cpp, moe_step.cpp, gemv.cpp, qgemv.cpp, norm.cpp) read each weight matrix once, prefetching the
next rows, for up to ``MAX_ROWS`` sequences, with bfloat16 weights read directly (half the bytes; int8 / int4 ones,
``ops/quant.py``, dequantized in registers: a quarter, an eighth; an int4 product's x quantized to int8 per group,
as the op defines it). Each row's dot products
are summed in the same order whatever the number of rows, so a row's result does not depend on the others in
its batch (what a server's batch invariance rests on). Each wrapper checks its
inputs and hands what its kernel does not take to the op's reference: more rows, other dtypes, a gradient to
compute, a projection that is not a plain weight (a LoRA wrapper). The checks are a few attribute reads: at
batch 1 the Python around the kernels is a measurable part of a token.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from .. import registry
from ..linear import linear_reference
from ..mamba_step import mamba_step_reference
from ..moe import moe_step_reference
from ..norm import add_rmsnorm_reference
from ..quant import QuantizedWeight
from .build import DTYPE_CODE, KERNEL_DTYPES, MAX_ROWS, available, grad_needed, library, ptr, threads_for

ACTIVATION_CODE = {"silu": 0, "gelu": 1}  # csrc/act.h kSilu, kGelu
QUANT_MODE_CODE = {"int8": 0, "int4": 1}  # csrc/qgemv.cpp bm_qgemv
STEP_QUANT_CODE = {"int8": 1, "int4": 2}  # bm_mamba_step / bm_moe_step projections (0: plain, the weight dtype)


def _ready(dtype: torch.dtype, *tensors) -> bool:
    """Every argument is None or a contiguous tensor of ``dtype`` (a module operand, such as LoRA, is not)."""
    for t in tensors:
        if t is not None and (not torch.is_tensor(t) or t.dtype is not dtype or not t.is_contiguous()):
            return False
    return True


def _quantized_ready(qws, keys) -> bool:
    """Every one of ``qws`` is a contiguous CPU ``QuantizedWeight`` whose ``kernel_key`` (mode, group size, out
    and in features) is ``keys[j]``."""
    return len(qws) == len(keys) and all(type(w) is QuantizedWeight and w.kernel_key == k for w, k in zip(qws, keys))


def mamba_step_cpu(h, in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A, D, out_proj, conv_state, ssm_state):
    """The whole mixer step in one call (csrc/mamba_step.cpp). The three projections are plain weights (the conv
    weight's dtype) or all ``QuantizedWeight``s of one mode and group size (read as bm_qgemv reads them)."""
    b, H = h.shape
    wdt = conv_w.dtype
    if type(in_proj) is QuantizedWeight:
        inner, P = conv_w.shape[0], A.shape[1] * 2 + dt_w.shape[1]
        mode, group = in_proj.mode, in_proj.group_size
        ok = _quantized_ready((in_proj, x_proj, out_proj),
                              ((mode, group, 2 * inner, H), (mode, group, P, inner), (mode, group, H, inner)))
        quant, projections = STEP_QUANT_CODE[mode], ()
        w_in, w_x, w_out = in_proj.q, x_proj.q, out_proj.q
        scales = (in_proj.scales.data_ptr(), x_proj.scales.data_ptr(), out_proj.scales.data_ptr()) if ok else None
    else:
        ok, quant, group, scales = True, 0, 0, (None, None, None)
        w_in, w_x, w_out = projections = (in_proj, x_proj, out_proj)
    if (not ok or b > MAX_ROWS or not b or h.dtype not in KERNEL_DTYPES or wdt not in KERNEL_DTYPES or dt_b is None
            or not _ready(wdt, conv_w, conv_b, dt_w, dt_b, *projections)
            or not (conv_state.dtype is wdt or conv_state.dtype is torch.float32) or not conv_state.is_contiguous()
            or not _ready(torch.float32, A, D, ssm_state)
            or (torch.is_grad_enabled() and grad_needed(h, conv_w, conv_b, dt_w, dt_b, A, D, *projections))):
        return mamba_step_reference(h, in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A, D, out_proj, conv_state,
                                    ssm_state)
    h = h.contiguous()
    inner, K = conv_w.shape
    out = torch.empty(b, H, dtype=h.dtype)
    rc = library().bm_mamba_step(DTYPE_CODE[h.dtype], DTYPE_CODE[wdt], DTYPE_CODE[conv_state.dtype], h.data_ptr(),
                                 w_in.data_ptr(), conv_w.data_ptr(), ptr(conv_b), w_x.data_ptr(),
                                 dt_w.data_ptr(), dt_b.data_ptr(), A.data_ptr(), ptr(D), w_out.data_ptr(),
                                 conv_state.data_ptr(), ssm_state.data_ptr(), out.data_ptr(), b, H, inner,
                                 A.shape[1], dt_w.shape[1], K, threads_for(b * 3 * inner * H), quant, *scales,
                                 group)
    if rc:
        raise RuntimeError(f"blackmamba cpu mamba_step: unsupported inputs (code {rc})")
    return out


def moe_step_cpu(h, router_w, router_b, fc1, fc2, activation):
    """Routing and the chosen experts' gated MLPs in one call (csrc/moe_step.cpp). The experts' weights are plain
    (the router's dtype) or all ``QuantizedWeight``s of one mode and group size (read as bm_qgemv reads them)."""
    b, H = h.shape
    wdt = router_w.dtype if torch.is_tensor(router_w) else None
    E = len(fc1)
    w0 = fc1[0] if E else None
    if type(w0) is QuantizedWeight:
        F2 = w0.q.shape[0]
        mode, group = w0.mode, w0.group_size
        ok = (_quantized_ready(fc1, ((mode, group, F2, H),) * E)
              and _quantized_ready(fc2, ((mode, group, H, F2 // 2),) * E))
        quant, experts = STEP_QUANT_CODE[mode], ()
    else:
        ok, quant, group, experts = True, 0, 0, (*fc1, *fc2)
        F2 = w0.shape[0] if torch.is_tensor(w0) else 0  # (a module operand: the reference, below)
    if (not ok or not E or not 1 <= b <= MAX_ROWS or h.dtype not in KERNEL_DTYPES or wdt not in KERNEL_DTYPES
            or not _ready(wdt, router_w, router_b, *experts)
            or (torch.is_grad_enabled() and grad_needed(h, router_w, router_b, *experts))):
        return moe_step_reference(h, router_w, router_b, fc1, fc2, activation)
    h = h.contiguous()
    out = torch.empty(b, H, dtype=h.dtype)
    table = ctypes.c_void_p * E
    if quant:
        tables = (table(*[w.q.data_ptr() for w in fc1]), table(*[w.q.data_ptr() for w in fc2]),
                  table(*[w.scales.data_ptr() for w in fc1]), table(*[w.scales.data_ptr() for w in fc2]))
    else:
        tables = (table(*[w.data_ptr() for w in fc1]), table(*[w.data_ptr() for w in fc2]), None, None)
    rc = library().bm_moe_step(DTYPE_CODE[h.dtype], DTYPE_CODE[wdt], ACTIVATION_CODE[activation], h.data_ptr(),
                               router_w.data_ptr(), ptr(router_b), tables[0], tables[1], out.data_ptr(), b, H,
                               F2 // 2, E, threads_for(b * 3 * F2 * H), quant, tables[2], tables[3], group)
    if rc:
        raise RuntimeError(f"blackmamba cpu moe_step: unsupported inputs (code {rc})")
    return out


def linear_cpu(x, weight, bias=None):
    """float32 or bfloat16 weights times a few rows, read once (csrc/gemv.cpp), or a ``QuantizedWeight``'s bytes
    (csrc/qgemv.cpp); torch's matmul otherwise (see ops/linear.py)."""
    if type(weight) is QuantizedWeight:
        return _quantized_linear_cpu(x, weight, bias)
    i, o = x.shape[-1], weight.shape[0]
    rows = x.numel() // i if i else 0
    if (weight.dtype not in KERNEL_DTYPES or x.dtype not in KERNEL_DTYPES or not 1 <= rows <= MAX_ROWS
            or not weight.is_contiguous() or grad_needed(x, weight, bias)):
        return F.linear(x, weight, bias)
    xf = x.reshape(rows, i).float().contiguous()
    b = bias.float().contiguous() if bias is not None else None
    y = torch.empty(rows, o, dtype=torch.float32)
    rc = library().bm_gemv(DTYPE_CODE[weight.dtype], xf.data_ptr(), weight.data_ptr(), ptr(b), y.data_ptr(), rows,
                           i, o, threads_for(rows * i * o))
    if rc:
        raise RuntimeError(f"blackmamba cpu linear: unsupported inputs (code {rc})")
    return y.reshape(*x.shape[:-1], o).to(x.dtype)


def _quantized_linear_cpu(x, weight, bias):
    """int8 / int4 weights (ops/quant.py) times a few float32 or bfloat16 rows (int4: quantized per group),
    dequantized in registers and summed in float32 (csrc/qgemv.cpp); the reference (dequantize, then
    ``F.linear``) otherwise: more rows (a prefill dequantizes once a call), a gradient to compute, tensors
    elsewhere than the CPU."""
    i, o = weight.in_features, weight.q.shape[0]
    rows = x.numel() // i if x.shape[-1] == i else 0
    q, scales = weight.q, weight.scales
    if (x.dtype not in KERNEL_DTYPES or not 1 <= rows <= MAX_ROWS or q.device.type != "cpu"
            or not q.is_contiguous() or not scales.is_contiguous()
            or (bias is not None and (bias.shape != (o,) or bias.device.type != "cpu")) or grad_needed(x, bias)):
        return linear_reference(x, weight, bias)
    xf = x.reshape(rows, i).float().contiguous()
    b = bias.float().contiguous() if bias is not None else None
    y = torch.empty(rows, o, dtype=torch.float32)
    rc = library().bm_qgemv(QUANT_MODE_CODE[weight.mode], xf.data_ptr(), q.data_ptr(), scales.data_ptr(), ptr(b),
                            y.data_ptr(), rows, i, o, weight.group_size, threads_for(rows * i * o))
    if rc:
        raise RuntimeError(f"blackmamba cpu linear: unsupported quantized inputs (code {rc})")
    return y.reshape(*x.shape[:-1], o).to(x.dtype)


def add_rmsnorm_cpu(h, residual, weight, eps, residual_dtype):
    """The block entry in one call (csrc/norm.cpp; see ops/norm.py)."""
    if (h.dtype not in KERNEL_DTYPES or weight.dtype not in KERNEL_DTYPES or residual_dtype not in KERNEL_DTYPES
            or (residual is not None and residual.dtype is not residual_dtype) or not weight.is_contiguous()
            or (torch.is_grad_enabled() and grad_needed(h, residual, weight))):
        return add_rmsnorm_reference(h, residual, weight, eps, residual_dtype)
    h = h.contiguous()
    residual = residual.contiguous() if residual is not None else None  # kept referenced through the call
    out = torch.empty(h.shape, dtype=weight.dtype)
    res_out = torch.empty(h.shape, dtype=residual_dtype)
    H = h.shape[-1]
    rows = h.numel() // H if H else 0
    if rows:
        library().bm_add_rmsnorm(DTYPE_CODE[h.dtype], DTYPE_CODE[residual_dtype], DTYPE_CODE[weight.dtype],
                                 h.data_ptr(), ptr(residual),
                                 weight.data_ptr(), out.data_ptr(), res_out.data_ptr(), rows, H, eps,
                                 threads_for(rows * H * 8))
    return out, res_out


def exp_approx(x: torch.Tensor) -> torch.Tensor:
    """The kernels' float32 exp applied elementwise (to validate it against ``torch.exp``)."""
    x = x.float().contiguous()
    out = torch.empty_like(x)
    library().bm_exp(ptr(x), ptr(out), x.numel(), torch.get_num_threads())
    return out


registry.register("mamba_step", "cpu", mamba_step_cpu, available, devices=("cpu",))
registry.register("moe_step", "cpu", moe_step_cpu, available, devices=("cpu",))
registry.register("linear", "cpu", linear_cpu, available, devices=("cpu",))
registry.register("add_rmsnorm", "cpu", add_rmsnorm_cpu, available, devices=("cpu",))
