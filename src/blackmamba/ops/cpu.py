"""Fused CPU kernels, registered as backend ``cpu`` of the ops ``scan``, ``conv``, ``scan_step``, ``conv_step``,
``mamba_step``, ``linear`` and ``add_rmsnorm``; op ``grouped_mlp``'s cpu backend (ops/grouped_mlp.py) calls
its per-thread expert kernel from here too.

The C++ sources (``ops/csrc``) use no torch headers: on first use they are compiled (20-40 s) with the
system C++ compiler (``$CXX``, else ``c++``) into a shared library and called through ``ctypes`` on the
tensors' memory. The library is built for the host (``-march=native``; ``$BLACKMAMBA_CPU_ARCH`` names
another target, e.g. ``x86-64-v3``) and cached in a folder keyed on
the sources, the flags, the compiler and the CPU's instruction-set flags, so that a cache shared between
machines never hands a binary to a CPU that cannot run it:

    $BLACKMAMBA_CACHE/kernels/,  else ~/.cache/blackmamba/kernels/

Concurrent first uses (threads, pytest processes) are safe: each build compiles the sources in
parallel in a private folder and renames the library into place. If the build fails, one warning is
issued and ``auto`` uses the ``reference`` backend.

Dtypes: x and z may be float32 or bfloat16 (other floating types are computed in float32), delta
float32 or bfloat16; the scan accumulates in float32 (float64 when x is float64, which is what makes
``gradcheck`` meaningful). Up to 64 states per channel (Mamba uses 16); more run the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import backend as _backend
from .conv import causal_conv1d_reference, causal_conv1d_step_reference
from .mamba_step import mamba_step_reference
from .norm import add_rmsnorm_reference
from .scan import selective_scan_reference, selective_scan_step_reference

log = logging.getLogger("blackmamba")

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("scan_forward.cpp", "scan_backward.cpp", "conv.cpp", "step.cpp", "mamba_step.cpp", "gemv.cpp",
           "norm.cpp", "fastexp.cpp", "grouped_mlp.cpp")
HEADERS = ("simd.h", "dot.h", "scan.h")
# -march: the host's (native) unless BLACKMAMBA_CPU_ARCH names another target, e.g. x86-64-v3 (AVX2, the
# portable code paths) to test them on an AVX-512 machine or to build for an older CPU
CFLAGS = ("-O3", "-ffp-contract=fast", "-fopenmp", "-std=c++20", "-shared", "-fPIC")


DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2}

_lock = threading.Lock()
_lib = None
_tried = False


# --------------------------------------------------------------------------- build and load
def _flags() -> tuple[str, ...]:
    return (f"-march={os.environ.get('BLACKMAMBA_CPU_ARCH', '').strip() or 'native'}", *CFLAGS)


def _cpu_signature() -> str:
    """The host's instruction-set flags: a -march=native binary is only reused on a match."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {torch.backends.cpu.get_cpu_capability()}"


def _compiler() -> str:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++") or "c++"


def cache_dir() -> Path:
    root = os.environ.get("BLACKMAMBA_CACHE") or Path.home() / ".cache" / "blackmamba"
    return Path(root) / "kernels"


def library_path() -> Path:
    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        h.update((CSRC / f).read_bytes())
    for part in (" ".join(_flags()), _compiler(), _cpu_signature()):
        h.update(part.encode())
    return cache_dir() / f"blackmamba_cpu_{h.hexdigest()[:16]}.so"


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.splitlines() or ["?"]
        raise RuntimeError(f"{cmd[0]} failed: {errors[0].strip()}")


def _build(target: Path) -> None:
    """Compile every source in parallel into a private folder, link, and rename the library into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{target.stem}.", dir=target.parent))
    try:
        objects = [work / f"{Path(f).stem}.o" for f in SOURCES]
        compile_flags = [f for f in _flags() if f != "-shared"]
        with ThreadPoolExecutor(max_workers=len(SOURCES)) as pool:
            list(pool.map(_run, ([_compiler(), *compile_flags, "-c", str(CSRC / f), "-o", str(o)]
                                 for f, o in zip(SOURCES, objects))))
        _run([_compiler(), *_flags(), *map(str, objects), "-o", str(work / target.name)])
        os.replace(work / target.name, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _Tensors(ctypes.Structure):
    """Mirror of ``bm::scan::Tensors`` (csrc/scan.h): pointers, (batch, time) strides in elements, sizes, dtypes."""

    _fields_ = ([(f, ctypes.c_void_p) for f in ("x", "delta", "z", "B", "C", "A", "D", "init")]
                + [(f, ctypes.c_int64) for f in ("x_sb", "x_sl", "delta_sb", "delta_sl", "z_sb", "z_sl",
                                                  "B_sb", "B_sl", "C_sb", "C_sl", "b", "l", "d", "n")]
                + [("dtype_x", ctypes.c_int), ("dtype_delta", ctypes.c_int)])


_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# name → (result, argument types) of every extern "C" function in csrc/. ctypes passes an argument beyond
# argtypes with its default conversion and one of the wrong width as declared: a 32-bit int in a 64-bit
# stack slot leaves the upper half as whatever the stack held. tests/test_cpu_abi.py checks this table
# against the C declarations.
SIGNATURES = {
    "bm_vector_bytes": (_INT, []),
    "bm_scan_chunk": (_INT, []),
    "bm_scan_max_state": (_INT, []),
    "bm_scan_ranges": (_I64, [_I64, _I64, _INT, _INT, _INT]),
    "bm_scan_forward": (_INT, [ctypes.POINTER(_Tensors), _P, _P, _P, _I64, _INT]),
    "bm_scan_backward": (_INT, [ctypes.POINTER(_Tensors)] + [_P] * 11 + [_I64, _INT]),
    "bm_conv_forward": (_INT, [_INT, _P, _I64, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT]),
    "bm_conv_backward": (_INT, [_INT, _P, _I64, _I64] + [_P] * 8 + [_I64, _I64, _I64, _I64, _INT]),
    "bm_ssm_step": (None, [_P] * 9 + [_I64, _I64, _I64, _INT]),
    "bm_conv_step": (_INT, [_INT] + [_P] * 5 + [_I64, _I64, _I64, _INT]),
    "bm_mamba_step_max_rows": (_INT, []),
    "bm_mamba_step": (_INT, [_INT, _INT, _INT] + [_P] * 13 + [_I64] * 6 + [_INT]),
    "bm_gemv_max_rows": (_INT, []),
    "bm_gemv": (_INT, [_INT, _P, _P, _P, _P, _I64, _I64, _I64, _INT]),
    "bm_add_rmsnorm": (_INT, [_INT, _INT, _INT, _P, _P, _P, _P, _P, _I64, _I64, ctypes.c_float, _INT]),
    "bm_exp": (None, [_P, _P, _I64, _INT]),
    "bm_grouped_mlp_forward": (_INT, [_P, _INT, _I64, _P, _I64, _I64] + [_P] * 5 + [_INT]),
    "bm_grouped_mlp_backward": (_INT, [_P, _INT, _I64, _P, _I64, _I64] + [_P] * 8 + [_INT]),
}


def _declare(lib) -> None:
    for name, (res, args) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def library():
    """The compiled kernels (ctypes.CDLL), built on first use; None if they cannot be built (warns once)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                path = library_path()
                if not path.exists():
                    log.info("blackmamba: compiling the fused CPU kernels into %s", path)
                    _build(path)
                lib = ctypes.CDLL(str(path))
                _declare(lib)
                if lib.bm_mamba_step_max_rows() != _MAX_ROWS:
                    raise RuntimeError("ops/cpu.py _MAX_ROWS disagrees with csrc/dot.h kDotMaxRows")
                _lib = lib
            except Exception as e:  # no compiler, unsupported flags or platform, unwritable cache, ...
                warnings.warn(f"blackmamba: fused CPU kernels unavailable ({e}); using the reference PyTorch ops",
                              RuntimeWarning, stacklevel=3)
                log.debug("blackmamba: CPU kernel build failed", exc_info=True)
            _tried = True
    return _lib


def available() -> bool:
    return library() is not None


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _threads(work: int) -> int:
    """torch's thread count, or 1 for work (state updates) too small to repay waking the others."""
    return torch.get_num_threads() if work >= 1 << 16 else 1


# --------------------------------------------------------------------------- scan
def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t.to(dtype)`` (differentiable), skipping the call when nothing changes: the scan wrapper's casts
    are most of its Python time on a 1 ms call."""
    return t if t is None or t.dtype is dtype else t.to(dtype)


def _kernel_dtypes(x, delta, A, B, C, D, z, initial_state):
    """Cast the inputs to what the kernels take (differentiable casts; no-ops when already right)."""
    S = torch.float64 if x.dtype is torch.float64 else torch.float32
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float64):
        x = x.float()
    if x.dtype is not torch.bfloat16 or delta.dtype not in (torch.float32, torch.bfloat16):
        delta = _as(delta, S)  # compiled pairs: fp32/fp32, bf16/fp32, bf16/bf16, fp64/fp64
    z = _as(z, x.dtype)
    A, B, C, D, initial_state = _as(A, S), _as(B, S), _as(C, S), _as(D, S), _as(initial_state, S)
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    initial_state = initial_state.contiguous() if initial_state is not None else None

    def unit_last(t):  # the kernels take any batch / time strides, but unit stride along the last dim
        return t if t is None or t.stride(-1) == 1 else t.contiguous()

    return tuple(unit_last(t) for t in (x, delta, A, B, C, D, z, initial_state))


def _describe(x, delta, A, B, C, D, z, initial_state) -> _Tensors:
    (b, l, d), n = x.shape, A.shape[1]
    xs, ds, Bs, Cs = x.stride(), delta.stride(), B.stride(), C.stride()
    zs = z.stride() if z is not None else (0, 0)
    return _Tensors(_ptr(x), _ptr(delta), _ptr(z), _ptr(B), _ptr(C), _ptr(A), _ptr(D), _ptr(initial_state),
                    xs[0], xs[1], ds[0], ds[1], zs[0], zs[1], Bs[0], Bs[1], Cs[0], Cs[1], b, l, d, n,
                    DTYPE_CODE[x.dtype], DTYPE_CODE[delta.dtype])


def _blocks(A: torch.Tensor, d: int) -> tuple[int, int]:
    """(lanes per vector, channel blocks) for compute dtype A.dtype."""
    lanes = library().bm_vector_bytes() // A.element_size()
    return lanes, -(-d // lanes)


def scan_forward(x, delta, A, B, C, D, z, initial_state, save_checkpoints: bool):
    """Kernel call on prepared inputs: (y (b, l, d) x.dtype, final state (b, d, n), checkpoints or None)."""
    lib = library()
    b, l, d = x.shape
    n = A.shape[1]
    lanes, nblk = _blocks(A, d)
    y = torch.empty(b, l, d, dtype=x.dtype)
    final = torch.empty(b, d, n, dtype=A.dtype)
    ckpt = None
    if save_checkpoints:
        ckpt = torch.empty(b, -(-l // lib.bm_scan_chunk()), nblk, n, lanes, dtype=A.dtype)
    desc = _describe(x, delta, A, B, C, D, z, initial_state)
    threads = _threads(b * l * d * n)
    ranges = lib.bm_scan_ranges(b, d, A.element_size(), threads, 1)
    rc = lib.bm_scan_forward(ctypes.byref(desc), _ptr(y), _ptr(final), _ptr(ckpt), ranges, threads)
    if rc:
        raise RuntimeError(f"blackmamba cpu scan: unsupported inputs (code {rc})")
    return y, final, ckpt


def scan_backward(x, delta, A, B, C, D, z, ckpt, dy, dfinal):
    """Gradients (dx, ddelta, dA, dB, dC, dD, dz, dinitial_state) for prepared inputs."""
    lib = library()
    b, l, d = x.shape
    n = A.shape[1]
    threads = _threads(b * l * d * n)
    ranges = lib.bm_scan_ranges(b, d, A.element_size(), threads, 0)
    S = A.dtype
    dx = torch.empty(b, l, d, dtype=x.dtype)
    ddelta = torch.empty(b, l, d, dtype=delta.dtype)
    dz = torch.empty(b, l, d, dtype=x.dtype) if z is not None else None
    dA = torch.empty(b, d, n, dtype=S)
    dD = torch.empty(b, d, dtype=S) if D is not None else None
    dB = torch.empty(ranges, b, l, n, dtype=S)  # partial sums per range of channels
    dC = torch.empty(ranges, b, l, n, dtype=S)
    dinit = torch.empty(b, d, n, dtype=S)
    desc = _describe(x, delta, A, B, C, D, z, None)
    rc = lib.bm_scan_backward(ctypes.byref(desc), _ptr(ckpt), _ptr(dy), _ptr(dfinal), _ptr(dx), _ptr(ddelta),
                              _ptr(dz), _ptr(dA), _ptr(dD), _ptr(dB), _ptr(dC), _ptr(dinit), ranges, threads)
    if rc:
        raise RuntimeError(f"blackmamba cpu scan backward: unsupported inputs (code {rc})")
    return (dx, ddelta, dA.sum(0), dB.sum(0), dC.sum(0), dD.sum(0) if dD is not None else None, dz, dinit)


class _ScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, z, initial_state):
        y, final, ckpt = scan_forward(x, delta, A, B, C, D, z, initial_state, True)
        ctx.save_for_backward(x, delta, A, B, C, D, z, ckpt)
        ctx.has_initial_state = initial_state is not None
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dfinal):
        x, delta, A, B, C, D, z, ckpt = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else dy.to(x.dtype).contiguous()
        dfinal = None if dfinal is None else dfinal.to(A.dtype).contiguous()
        dx, ddelta, dA, dB, dC, dD, dz, dinit = scan_backward(x, delta, A, B, C, D, z, ckpt, dy, dfinal)
        return dx, ddelta, dA, dB, dC, dD, dz, (dinit if ctx.has_initial_state else None)


def selective_scan_cpu(x, delta, A, B, C, D=None, z=None, initial_state=None):
    """The ``cpu`` backend of ``selective_scan`` (same contract as ``selective_scan_reference``)."""
    if A.shape[1] > library().bm_scan_max_state():
        return selective_scan_reference(x, delta, A, B, C, D, z, initial_state)
    args = _kernel_dtypes(x, delta, A, B, C, D, z, initial_state)
    if _grad_needed(*args):
        y, final = _ScanFunction.apply(*args)
    else:
        y, final, _ = scan_forward(*args, False)
    return y.to(x.dtype), final


# --------------------------------------------------------------------------- causal conv
def conv_forward(x, weight, bias, initial_state):
    """Kernel call on prepared inputs: (y (b, l, d) x.dtype, final state (b, d, K-1) in weight's dtype)."""
    b, l, d = x.shape
    K = weight.shape[1]
    y = torch.empty(b, l, d, dtype=x.dtype)
    final = torch.empty(b, d, K - 1, dtype=weight.dtype)
    rc = library().bm_conv_forward(DTYPE_CODE[x.dtype], _ptr(x), x.stride(0), x.stride(1), _ptr(weight), _ptr(bias),
                                   _ptr(initial_state), _ptr(y), _ptr(final), b, l, d, K, _threads(b * l * d * K))
    if rc:
        raise RuntimeError(f"blackmamba cpu conv: unsupported inputs (code {rc})")
    return y, final


class _ConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state):
        y, final = conv_forward(x, weight, bias, initial_state)
        ctx.save_for_backward(x, weight, initial_state)
        ctx.has_bias, ctx.has_initial_state = bias is not None, initial_state is not None
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dfinal):
        x, weight, initial_state = ctx.saved_tensors
        b, l, d = x.shape
        K = weight.shape[1]
        S = weight.dtype
        dy = torch.zeros(b, l, d, dtype=x.dtype) if dy is None else dy.to(x.dtype).contiguous()
        dfinal = None if dfinal is None else dfinal.to(S).contiguous()
        dx = torch.empty(b, l, d, dtype=x.dtype)
        dinit = torch.empty(b, d, K - 1, dtype=S)
        dw = torch.empty(b, d, K, dtype=S)
        dbias = torch.empty(b, d, dtype=S)
        rc = library().bm_conv_backward(DTYPE_CODE[x.dtype], _ptr(x), x.stride(0), x.stride(1), _ptr(weight),
                                        _ptr(initial_state), _ptr(dy), _ptr(dfinal), _ptr(dx), _ptr(dinit), _ptr(dw),
                                        _ptr(dbias), b, l, d, K, _threads(b * l * d * K))
        if rc:
            raise RuntimeError(f"blackmamba cpu conv backward: unsupported inputs (code {rc})")
        return (dx, dw.sum(0), dbias.sum(0) if ctx.has_bias else None,
                dinit if ctx.has_initial_state else None)


def causal_conv1d_cpu(x, weight, bias=None, initial_state=None):
    """The ``cpu`` backend of ``causal_conv1d``: (b, l, d) in and out, no transposes or padding copies."""
    if x.dtype not in DTYPE_CODE:
        return causal_conv1d_reference(x, weight, bias, initial_state)
    S = torch.float64 if x.dtype == torch.float64 else torch.float32
    dtype = x.dtype
    xk = x if x.stride(-1) == 1 else x.contiguous()
    args = (xk, weight.to(S).contiguous(), bias.to(S).contiguous() if bias is not None else None,
            initial_state.to(S).contiguous() if initial_state is not None else None)
    if _grad_needed(*args):
        y, final = _ConvFunction.apply(*args)
    else:
        y, final = conv_forward(*args)
    return y, final.to(dtype)


# --------------------------------------------------------------------------- decode steps
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_MAX_ROWS = 8  # csrc/dot.h kDotMaxRows; checked against the library when it loads


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_scan_step_cpu(x, delta, A, B, C, D, z, state):
    """The ``cpu`` backend of ``selective_scan_step``: one fused pass over the (b, d, n) state."""
    if _grad_needed(x, delta, A, B, C, D, z) or state.dtype != torch.float32 or not state.is_contiguous():
        return selective_scan_step_reference(x, delta, A, B, C, D, z, state)
    b, d = x.shape
    f32 = [None if t is None else t.float().contiguous() for t in (x, delta, A, B, C, D, z)]
    y = torch.empty(b, d, dtype=torch.float32)
    library().bm_ssm_step(*(_ptr(t) for t in f32), _ptr(state), _ptr(y), b, d, A.shape[1], _threads(b * d * A.shape[1]))
    return y.to(x.dtype)


def causal_conv1d_step_cpu(x, weight, bias, state):
    """The ``cpu`` backend of ``causal_conv1d_step``: output and state shift in one pass."""
    if (_grad_needed(x, weight, bias) or state.dtype != x.dtype or not state.is_contiguous()
            or x.dtype not in DTYPE_CODE):
        return causal_conv1d_step_reference(x, weight, bias, state)
    b, d = x.shape
    x = x.contiguous()
    weight = weight.to(x.dtype).contiguous()
    bias = bias.to(x.dtype).contiguous() if bias is not None else None
    y = torch.empty_like(x)
    library().bm_conv_step(DTYPE_CODE[x.dtype], _ptr(x), _ptr(weight), _ptr(bias), _ptr(state), _ptr(y), b, d,
                           weight.shape[1], _threads(b * d * weight.shape[1]))
    return y


def mamba_step_cpu(h, in_w, conv_w, conv_b, x_w, dt_w, dt_b, A_log, D, out_w, conv_state, ssm_state):
    """The ``cpu`` backend of ``mamba_step``: the whole mixer step in one call (see csrc/mamba_step.cpp)."""
    out = torch.empty(h.shape[0], in_w.shape[1], dtype=h.dtype)
    call = None if _grad_needed(h, A_log, D, in_w, conv_w, conv_b, x_w, dt_w, dt_b, out_w) else bind_mamba_step(
        h.contiguous(), out, in_w, conv_w, conv_b, x_w, dt_w, dt_b, A_log, D, out_w, conv_state, ssm_state)
    if call is None:
        return mamba_step_reference(h, in_w, conv_w, conv_b, x_w, dt_w, dt_b, A_log, D, out_w, conv_state, ssm_state)
    call()
    return out


def bind_mamba_step(h, out, in_w, conv_w, conv_b, x_w, dt_w, dt_b, A_log, D, out_w, conv_state,
                    ssm_state) -> Callable[[], None] | None:
    """The mamba_step kernel bound to fixed tensors (h → out, states updated in place), its inputs checked
    once; None if the kernel does not take them. Each call reads h's memory as it is then: a decode loop
    reusing its buffers (``decode.StepPlan``) pays a single ctypes call per layer and token. The call
    records nothing for autograd."""
    wdt = in_w.dtype
    b = h.shape[0]
    weights = (in_w, conv_w, conv_b, x_w, dt_w, dt_b, out_w)
    if (wdt not in _KERNEL_DTYPES or h.dtype not in _KERNEL_DTYPES or out.dtype != h.dtype or dt_b is None
            or conv_state.dtype != wdt or ssm_state.dtype != torch.float32 or not 1 <= b <= _MAX_ROWS
            or any(t is not None and (t.dtype != wdt or not t.is_contiguous()) for t in weights)
            or not all(t.is_contiguous() for t in (h, out, conv_state, ssm_state))
            or out.shape != (b, in_w.shape[1])):
        return None
    I, K = conv_w.shape
    N, R, H = A_log.shape[1], dt_w.shape[1], in_w.shape[1]
    A_log = A_log.detach().float().contiguous()  # copies if needed, kept alive by the closure
    D = D.detach().float().contiguous() if D is not None else None
    fn = _lib.bm_mamba_step
    args = (DTYPE_CODE[h.dtype], DTYPE_CODE[wdt], DTYPE_CODE[conv_state.dtype], h.data_ptr(), in_w.data_ptr(),
            conv_w.data_ptr(), _ptr(conv_b), x_w.data_ptr(), dt_w.data_ptr(), dt_b.data_ptr(), A_log.data_ptr(),
            _ptr(D), out_w.data_ptr(), conv_state.data_ptr(), ssm_state.data_ptr(), out.data_ptr(), b, H, I, N, R, K,
            _threads(b * 3 * I * H))

    def call(keep=(h, out, *weights, A_log, D, conv_state, ssm_state)):  # args holds bare pointers: keep all alive
        if fn(*args):
            raise RuntimeError("blackmamba cpu mamba_step: unsupported inputs")

    return call


def bind_gemv(x, weight, bias, out) -> Callable[[], None] | None:
    """The gemv kernel bound to fixed tensors: out (rows, o) = x (rows, i) @ weight.T + bias, all float32
    but weight (bfloat16): what ``linear_cpu`` computes before casting to x's dtype. None if the kernel does
    not take them (see ``bind_mamba_step``)."""
    rows, i = x.shape
    o = weight.shape[0]
    if (weight.dtype != torch.bfloat16 or x.dtype != torch.float32 or out.dtype != torch.float32
            or not 1 <= rows <= library().bm_gemv_max_rows() or weight.shape[1] != i or out.shape != (rows, o)
            or not all(t.is_contiguous() for t in (x, weight, out))):
        return None
    b = bias.detach().float().contiguous() if bias is not None else None
    fn = _lib.bm_gemv
    args = (DTYPE_CODE[weight.dtype], x.data_ptr(), weight.data_ptr(), _ptr(b), out.data_ptr(), rows, i, o,
            _threads(rows * i * o))

    def call(keep=(x, weight, b, out)):  # args holds bare pointers: keep all alive
        if fn(*args):
            raise RuntimeError("blackmamba cpu linear: unsupported inputs")

    return call


def linear_cpu(x, weight, bias=None):
    """The ``cpu`` backend of ``linear``: bfloat16 weights times a few rows, read once (see ops/linear.py)."""
    i, o = x.shape[-1], weight.shape[0]
    rows = x.numel() // i if i else 0
    call = None
    if (weight.dtype == torch.bfloat16 and x.dtype in _KERNEL_DTYPES and 1 <= rows <= library().bm_gemv_max_rows()
            and not _grad_needed(x, weight, bias)):
        y = torch.empty(rows, o, dtype=torch.float32)
        call = bind_gemv(x.reshape(rows, i).float().contiguous(), weight.contiguous(), bias, y)
    if call is None:  # float32 weights, more rows than the kernel takes, autograd: torch's matmul
        return F.linear(x, weight, bias)
    call()
    return y.reshape(*x.shape[:-1], o).to(x.dtype)


def add_rmsnorm_cpu(h, residual, weight, eps, residual_dtype):
    """The ``cpu`` backend of ``add_rmsnorm``: one call for the block entry (see ops/norm.py)."""
    out = torch.empty(h.shape, dtype=weight.dtype)
    res_out = torch.empty(h.shape, dtype=residual_dtype)
    call = None if _grad_needed(h, residual, weight) else bind_add_rmsnorm(
        h.contiguous(), None if residual is None else residual.contiguous(), weight, eps, out, res_out)
    if call is None:
        return add_rmsnorm_reference(h, residual, weight, eps, residual_dtype)
    call()
    return out, res_out


def bind_add_rmsnorm(h, residual, weight, eps, out, res_out) -> Callable[[], None] | None:
    """The add_rmsnorm kernel bound to fixed tensors (h, residual or None → out, res_out; residual may be
    res_out itself), checked once; None if the kernel does not take them (see ``bind_mamba_step``)."""
    kinds = _KERNEL_DTYPES
    if (h.dtype not in kinds or weight.dtype not in kinds or res_out.dtype not in kinds or out.dtype != weight.dtype
            or (residual is not None and (residual.dtype != res_out.dtype or residual.shape != h.shape))
            or out.shape != h.shape or res_out.shape != h.shape
            or not all(t.is_contiguous() for t in (h, weight, out, res_out) + ((residual,) if residual is not None
                                                                                  else ()))):
        return None
    H = h.shape[-1]
    rows = h.numel() // H if H else 0
    fn = _lib.bm_add_rmsnorm
    args = (DTYPE_CODE[h.dtype], DTYPE_CODE[res_out.dtype], DTYPE_CODE[weight.dtype], h.data_ptr(), _ptr(residual),
            weight.data_ptr(), out.data_ptr(), res_out.data_ptr(), rows, H, eps, _threads(rows * H * 8))
    keep = (h, residual, weight, out, res_out)  # args holds bare pointers: keep the tensors alive with the call
    return (lambda keep=keep: fn(*args)) if rows else (lambda: None)


def exp_approx(x: torch.Tensor) -> torch.Tensor:
    """The kernels' float32 exp applied elementwise (to validate it against ``torch.exp``)."""
    x = x.float().contiguous()
    out = torch.empty_like(x)
    library().bm_exp(_ptr(x), _ptr(out), x.numel(), torch.get_num_threads())
    return out


_backend.register("scan", "cpu", selective_scan_cpu, available, devices=("cpu",))
_backend.register("conv", "cpu", causal_conv1d_cpu, available, devices=("cpu",))
_backend.register("scan_step", "cpu", selective_scan_step_cpu, available, devices=("cpu",))
_backend.register("conv_step", "cpu", causal_conv1d_step_cpu, available, devices=("cpu",))
_backend.register("mamba_step", "cpu", mamba_step_cpu, available, devices=("cpu",))
_backend.register("linear", "cpu", linear_cpu, available, devices=("cpu",))
_backend.register("add_rmsnorm", "cpu", add_rmsnorm_cpu, available, devices=("cpu",))
