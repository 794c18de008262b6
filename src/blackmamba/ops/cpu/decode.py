"""The ``cpu`` backend of the decode-time ops: ``mamba_step``, ``moe_step``, ``linear`` and ``add_rmsnorm``.

Decoding a token reads every active weight once, so its speed is the memory bandwidth; these kernels
(csrc/mamba_step.cpp, moe_step.cpp, gemv.cpp, qgemv.cpp, norm.cpp) read each weight matrix once, prefetching the
next rows, for up to ``MAX_ROWS`` sequences, with bfloat16 weights read directly (half the bytes; int8 / int4 ones,
``ops/quant.py``, read as stored: a quarter, an eighth; each product's x quantized per group as the op defines it,
int16 for int8 weights and int8 for int4 ones, and multiplied in integers where the CPU has AVX2). Each row's dot
products are summed in the same order whatever the number of rows, so a row's result does not depend on the
others in its batch (what a server's batch invariance rests on). Each wrapper checks its
inputs and hands what its kernel does not take to the op's reference: more rows, other dtypes, a gradient to
compute, a projection that is not a plain weight (a LoRA wrapper). The checks are a few attribute reads: at
batch 1 the Python around the kernels is a measurable part of a token.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..linear import linear_reference
from ..mamba_step import mamba_step_reference
from ..moe import moe_step_reference
from ..norm import add_rmsnorm_reference
from ..quant import QuantizedWeight
from .build import DTYPE_CODE, KERNEL_DTYPES, MAX_ROWS, available, grad_needed, library, ptr, threads_for
from .replay import launch

ACTIVATION_CODE = {"silu": 0, "gelu": 1}  # csrc/act.h kSilu, kGelu
QUANT_MODE_CODE = {"int8": 0, "int4": 1}  # csrc/qgemv.cpp bm_qgemv
STEP_QUANT_CODE = {"int8": 1, "int4": 2}  # bm_mamba_step / bm_moe_step projections (0: plain, the weight dtype)


def _ready(dtype: torch.dtype, *tensors) -> bool:
    """Every argument is None or a contiguous CPU tensor of ``dtype`` (a module operand, such as LoRA, is not)."""
    for t in tensors:
        if t is not None and (not torch.is_tensor(t) or t.dtype is not dtype or not t.is_contiguous() or not t.is_cpu):
            return False
    return True


def _quantized_ready(qws, keys) -> bool:
    """Every one of ``qws`` is a contiguous CPU ``QuantizedWeight`` whose ``kernel_key`` (mode, group size, out
    and in features) is ``keys[j]``."""
    return len(qws) == len(keys) and all(type(w) is QuantizedWeight and w.kernel_key == k for w, k in zip(qws, keys))


def _shaped(t, *shape) -> bool:
    """``t`` is None or a tensor of exactly ``shape``."""
    return t is None or (torch.is_tensor(t) and t.shape == shape)


def _needs_grad(*tensors) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _held(*tensors) -> tuple:
    """What a binding keeps of the tensors whose addresses it takes, so that their memory stays alive: a
    Parameter's alias (``module.to`` replaces the memory under a Parameter and frees the old: the alias keeps it,
    and the binding computes with the old values rather than reading freed memory); any other tensor itself
    (a replaced buffer or a view keeps its own memory). What nothing can hold: ``share_memory_()`` moving a
    storage in place."""
    return tuple(t.detach() if isinstance(t, nn.Parameter) else t for t in tensors)


def bind_mamba_step_cpu(in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A, D, out_proj):
    """Op ``mamba_step`` with its weights fixed, for csrc/mamba_step.cpp (the whole mixer step in one call): the
    weights are checked and their addresses taken once; a call (h, conv_state, ssm_state) → out checks what
    changes. The three projections are plain weights (the conv weight's dtype) or all ``QuantizedWeight``s of
    one mode and group size (read as bm_qgemv reads them); other weights go to the reference, and so does a
    call the kernel does not take (more rows, other dtypes or shapes, a gradient to compute)."""
    weights = (in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A, D, out_proj)

    def reference(h, conv_state, ssm_state):
        return mamba_step_reference(h, *weights, conv_state, ssm_state)

    if not (torch.is_tensor(conv_w) and conv_w.dim() == 2 and torch.is_tensor(A) and A.dim() == 2
            and torch.is_tensor(dt_w) and dt_w.dim() == 2):
        return reference
    wdt = conv_w.dtype
    (inner, K), N, R = conv_w.shape, A.shape[1], dt_w.shape[1]
    if type(in_proj) is QuantizedWeight:
        H, mode, group = in_proj.in_features, in_proj.mode, in_proj.group_size
        ok = _quantized_ready((in_proj, x_proj, out_proj),
                              ((mode, group, 2 * inner, H), (mode, group, R + 2 * N, inner), (mode, group, H, inner)))
        quant, plain = STEP_QUANT_CODE[mode], ()
        mats, scales = (in_proj.q, x_proj.q, out_proj.q), (in_proj.scales, x_proj.scales, out_proj.scales)
    else:
        H = in_proj.shape[1] if torch.is_tensor(in_proj) and in_proj.dim() == 2 else 0
        ok = (H > 0 and _shaped(in_proj, 2 * inner, H) and _shaped(x_proj, R + 2 * N, inner)
              and _shaped(out_proj, H, inner))
        quant, group, plain = 0, 0, (in_proj, x_proj, out_proj)
        mats, scales = plain, (None, None, None)
    if not (ok and wdt in KERNEL_DTYPES and _ready(wdt, conv_w, conv_b, dt_w, dt_b, *plain)
            and _ready(torch.float32, A, D) and dt_b is not None and _shaped(A, inner, N) and _shaped(dt_w, inner, R)
            and _shaped(conv_b, inner) and _shaped(dt_b, inner) and _shaped(D, inner)):
        return reference
    grad_tensors = (conv_w, conv_b, dt_w, dt_b, A, D, *plain)  # whether one needs a gradient: asked at each call
    kernel, w_code, state_dtypes, work = library().bm_mamba_step, DTYPE_CODE[wdt], (wdt, torch.float32), 3 * inner * H
    held = _held(mats[0], conv_w, conv_b, mats[1], dt_w, dt_b, A, D, mats[2], *scales)
    operands = tuple(ptr(t) for t in held[:9])
    sizes, quantization = (H, inner, N, R, K), (quant, *(ptr(s) for s in held[9:]), group)

    def step(h, conv_state, ssm_state, _keep=held):  # (_keep: the memory the addresses point to, kept alive)
        b = h.shape[0] if h.dim() == 2 else 0
        if (not 1 <= b <= MAX_ROWS or h.shape[1] != H or h.dtype not in KERNEL_DTYPES or not h.is_cpu
                or conv_state.dtype not in state_dtypes or conv_state.shape != (b, inner, K - 1)
                or not conv_state.is_contiguous() or not conv_state.is_cpu or ssm_state.dtype is not torch.float32
                or ssm_state.shape != (b, inner, N) or not ssm_state.is_contiguous() or not ssm_state.is_cpu
                or (torch.is_grad_enabled() and (h.requires_grad or _needs_grad(*grad_tensors)))):
            return reference(h, conv_state, ssm_state)
        h = h.contiguous()
        out = torch.empty(b, H, dtype=h.dtype)
        rc = launch(kernel, DTYPE_CODE[h.dtype], w_code, DTYPE_CODE[conv_state.dtype], h.data_ptr(), *operands,
                    conv_state.data_ptr(), ssm_state.data_ptr(), out.data_ptr(), b, *sizes, threads_for(b * work),
                    *quantization)
        if rc:
            raise RuntimeError(f"blackmamba cpu mamba_step: unsupported inputs (code {rc})")
        return out

    return step


def mamba_step_cpu(h, in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A, D, out_proj, conv_state, ssm_state):
    """One call: ``bind_mamba_step_cpu``'s, made for it."""
    return bind_mamba_step_cpu(in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A, D, out_proj)(h, conv_state, ssm_state)


def bind_moe_step_cpu(router_w, router_b, fc1, fc2, activation):
    """Op ``moe_step`` with its weights fixed, for csrc/moe_step.cpp (routing and the chosen experts' gated MLPs in
    one call): the weights are checked and the experts' address tables built once; a call h → out checks h. The
    experts' weights are plain (the router's dtype) or all ``QuantizedWeight``s of one mode and group size (read
    as bm_qgemv reads them); other weights, and a call the kernel does not take, go to the reference."""
    fc1, fc2 = list(fc1), list(fc2)

    def reference(h):
        return moe_step_reference(h, router_w, router_b, fc1, fc2, activation)

    E = len(fc1)
    w0 = fc1[0] if E else None
    if type(w0) is QuantizedWeight:
        (F2, H), mode, group = w0.shape, w0.mode, w0.group_size
        ok = (_quantized_ready(fc1, ((mode, group, F2, H),) * E)
              and _quantized_ready(fc2, ((mode, group, H, F2 // 2),) * E))
        quant, experts = STEP_QUANT_CODE[mode], ()
        tables = ([w.q for w in fc1], [w.q for w in fc2], [w.scales for w in fc1], [w.scales for w in fc2])
    else:
        F2, H = w0.shape if torch.is_tensor(w0) and w0.dim() == 2 else (0, 0)  # (a module operand: the reference)
        ok = bool(H) and all(_shaped(w, F2, H) for w in fc1) and all(_shaped(w, H, F2 // 2) for w in fc2)
        quant, group, experts = 0, 0, (*fc1, *fc2)
        tables = (fc1, fc2, None, None)
    wdt = router_w.dtype if torch.is_tensor(router_w) else None
    if not (ok and E and len(fc2) == E and wdt in KERNEL_DTYPES and activation in ACTIVATION_CODE
            and _ready(wdt, router_w, router_b, *experts) and _shaped(router_w, E, H) and _shaped(router_b, E)):
        return reference
    grad_tensors = (router_w, router_b, *experts)  # whether one needs a gradient: asked at each call
    kernel, w_code, act, work = library().bm_moe_step, DTYPE_CODE[wdt], ACTIVATION_CODE[activation], 3 * F2 * H
    table = ctypes.c_void_p * E
    held = (_held(router_w, router_b), *(None if ts is None else _held(*ts) for ts in tables))
    fc1_t, fc2_t, fc1_s, fc2_s = (None if ts is None else table(*[t.data_ptr() for t in ts]) for ts in held[1:])
    router = (held[0][0].data_ptr(), ptr(held[0][1]), fc1_t, fc2_t)

    def step(h, _keep=held):  # (_keep: the memory the addresses point to, kept alive)
        b = h.shape[0] if h.dim() == 2 else 0
        if (not 1 <= b <= MAX_ROWS or h.shape[1] != H or h.dtype not in KERNEL_DTYPES or not h.is_cpu
                or (torch.is_grad_enabled() and (h.requires_grad or _needs_grad(*grad_tensors)))):
            return reference(h)
        h = h.contiguous()
        out = torch.empty(b, H, dtype=h.dtype)
        rc = launch(kernel, DTYPE_CODE[h.dtype], w_code, act, h.data_ptr(), *router, out.data_ptr(), b, H, F2 // 2,
                    E, threads_for(b * work), quant, fc1_s, fc2_s, group)
        if rc:
            raise RuntimeError(f"blackmamba cpu moe_step: unsupported inputs (code {rc})")
        return out

    return step


def moe_step_cpu(h, router_w, router_b, fc1, fc2, activation):
    """One call: ``bind_moe_step_cpu``'s, made for it."""
    return bind_moe_step_cpu(router_w, router_b, fc1, fc2, activation)(h)


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
    rc = launch(library().bm_gemv, DTYPE_CODE[weight.dtype], xf.data_ptr(), weight.data_ptr(), ptr(b), y.data_ptr(),
                rows, i, o, threads_for(rows * i * o))
    if rc:
        raise RuntimeError(f"blackmamba cpu linear: unsupported inputs (code {rc})")
    return y.reshape(*x.shape[:-1], o).to(x.dtype)


def _quantized_linear_cpu(x, weight, bias):
    """int8 / int4 weights (ops/quant.py) times a few float32 or bfloat16 rows (quantized per group as the product
    defines), read as stored and summed exactly in integers or in float32 (csrc/qgemv.cpp); the reference
    (dequantize, then ``F.linear``) otherwise: more rows (a prefill dequantizes once a call), a gradient to
    compute, tensors elsewhere than the CPU."""
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
    rc = launch(library().bm_qgemv, QUANT_MODE_CODE[weight.mode], xf.data_ptr(), q.data_ptr(), scales.data_ptr(),
                ptr(b), y.data_ptr(), rows, i, o, weight.group_size, threads_for(rows * i * o))
    if rc:
        raise RuntimeError(f"blackmamba cpu linear: unsupported quantized inputs (code {rc})")
    return y.reshape(*x.shape[:-1], o).to(x.dtype)


def bind_add_rmsnorm_cpu(weight, eps, residual_dtype):
    """Op ``add_rmsnorm`` with its weight fixed, for csrc/norm.cpp (the block entry in one call; see ops/norm.py):
    a call (h, residual) → (out, residual). ``residual_dtype`` None: h's."""

    def reference(h, residual):
        return add_rmsnorm_reference(h, residual, weight, eps, residual_dtype or h.dtype)

    if not (weight.dtype in KERNEL_DTYPES and weight.dim() == 1 and _ready(weight.dtype, weight)):
        return reference
    held = _held(weight)
    H, kernel, w_dtype, w_ptr = weight.shape[0], library().bm_add_rmsnorm, weight.dtype, held[0].data_ptr()

    def step(h, residual, _keep=held):  # (_keep: the memory the address points to, kept alive)
        res_dtype = residual_dtype or h.dtype
        if (h.dtype not in KERNEL_DTYPES or res_dtype not in KERNEL_DTYPES or h.dim() == 0 or h.shape[-1] != H
                or not h.is_cpu or (residual is not None and (residual.dtype is not res_dtype
                                                              or residual.shape != h.shape or not residual.is_cpu))
                or (torch.is_grad_enabled() and (weight.requires_grad or h.requires_grad
                                                 or (residual is not None and residual.requires_grad)))):
            return reference(h, residual)
        h = h.contiguous()
        residual = residual.contiguous() if residual is not None else None  # kept referenced through the call
        out = torch.empty(h.shape, dtype=w_dtype)
        res_out = torch.empty(h.shape, dtype=res_dtype)
        rows = h.numel() // H if H else 0
        if rows:
            launch(kernel, DTYPE_CODE[h.dtype], DTYPE_CODE[res_dtype], DTYPE_CODE[w_dtype], h.data_ptr(),
                   ptr(residual), w_ptr, out.data_ptr(), res_out.data_ptr(), rows, H, eps, threads_for(rows * H * 8))
        return out, res_out

    return step


def add_rmsnorm_cpu(h, residual, weight, eps, residual_dtype):
    """One call: ``bind_add_rmsnorm_cpu``'s, made for it."""
    return bind_add_rmsnorm_cpu(weight, eps, residual_dtype)(h, residual)


def exp_approx(x: torch.Tensor) -> torch.Tensor:
    """The kernels' float32 exp applied elementwise (to validate it against ``torch.exp``)."""
    x = x.float().contiguous()
    out = torch.empty_like(x)
    launch(library().bm_exp, ptr(x), ptr(out), x.numel(), torch.get_num_threads())
    return out


registry.register("mamba_step", "cpu", mamba_step_cpu, available, devices=("cpu",), bind=bind_mamba_step_cpu)
registry.register("moe_step", "cpu", moe_step_cpu, available, devices=("cpu",), bind=bind_moe_step_cpu)
registry.register("linear", "cpu", linear_cpu, available, devices=("cpu",))
registry.register("add_rmsnorm", "cpu", add_rmsnorm_cpu, available, devices=("cpu",), bind=bind_add_rmsnorm_cpu)
