"""MKL's batched float32 GEMM (``cblas_sgemm_batch``) and its plain ``sgemm_``, in PyTorch's own copy of MKL.

PyTorch's x86-64 Linux wheels link Intel MKL into ``libtorch_cpu`` and export its BLAS functions
(checked on the 2.13.0 CPU wheel this project pins), so both are there without another dependency; a
build without the symbols, or whose copy fails the self-test, leaves ``available()`` False. ``gemm_batch``
calls the batched GEMM through ctypes on tensors' memory: one call computes a list of independent
products of different shapes. ``sgemm_address`` hands ``sgemm_`` to C kernels that multiply on their own
OpenMP threads (``ops/cpu/csrc/grouped_mlp.cpp``): PyTorch and the kernels share one OpenMP runtime, so MKL
sees the parallel region and runs each call on the calling thread.

Why: the expert matmuls of an MoE layer (a few hundred rows each, each with its own weight) run faster as one
batched call than as one ``torch.mm`` per expert, which pays MKL's fixed cost and thread start-up per expert
(docs/benchmarks.md has the measurement).

``available()`` is False where a symbol is missing (other platforms, other BLAS builds) or where a
self-test on small matrices disagrees with ``torch.mm``; callers then use ``torch.mm``.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import torch

log = logging.getLogger("blackmamba")

_ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS_LAYOUT / CBLAS_TRANSPOSE
_INT, _P = ctypes.c_int, ctypes.c_void_p  # MKL_INT is 32-bit in the LP64 interface torch links
# void cblas_sgemm_batch(layout, transa[], transb[], m[], n[], k[], alpha[], a[], lda[], b[], ldb[], beta[], c[],
#                        ldc[], group_count, group_size[])
_ARGTYPES = [_INT] + [_P] * 13 + [_INT, _P]

_lock = threading.Lock()
_fn = None
_sgemm = None  # Fortran sgemm_ of the same MKL, for C kernels that multiply on their own threads
_tried = False


def _load():
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = Path(torch.__file__).parent / "lib" / name
        if path.exists():
            lib = ctypes.CDLL(str(path))
            fn, sgemm = getattr(lib, "cblas_sgemm_batch", None), getattr(lib, "sgemm_", None)
            if fn is not None and sgemm is not None:
                fn.restype, fn.argtypes = None, _ARGTYPES
                sgemm.restype, sgemm.argtypes = None, [_P] * 13
                return fn, sgemm
    return None, None


def _self_test(sgemm) -> bool:
    """The batched GEMM on two groups of different shapes and transpositions, and sgemm_ on one product,
    against torch.mm (catches an ILP64 build)."""
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)  # a1 @ b1.T
    a2, b2 = torch.randn(4, 6, generator=g), torch.randn(4, 2, generator=g)  # a2.T @ b2
    c1, c2 = torch.full((5, 3), float("nan")), torch.full((6, 2), float("nan"))
    _call([(NO_TRANS, TRANS, a1, b1, c1, 7), (TRANS, NO_TRANS, a2, b2, c2, 4)])
    # column-major sgemm_: c1.T (3, 5) = b1 @ a1.T, i.e. op 'T' on b1's column-major (7, 3) view
    c3 = torch.full((5, 3), float("nan"))
    i = ctypes.c_int
    one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
    sgemm(ctypes.c_char_p(b"T"), ctypes.c_char_p(b"N"), ctypes.byref(i(3)), ctypes.byref(i(5)), ctypes.byref(i(7)),
          ctypes.byref(one), b1.data_ptr(), ctypes.byref(i(7)), a1.data_ptr(), ctypes.byref(i(7)), ctypes.byref(zero),
          c3.data_ptr(), ctypes.byref(i(3)))
    want = a1 @ b1.T
    return (torch.allclose(c1, want, atol=1e-5) and torch.allclose(c2, a2.T @ b2, atol=1e-5)
            and torch.allclose(c3, want, atol=1e-5))


def available() -> bool:
    """Whether ``gemm_batch`` and ``sgemm_address`` can be used (symbols found, self-test passed); decided once."""
    global _fn, _sgemm, _tried
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    fn, sgemm = _load()
                    _fn = fn  # the self-test's batched call goes through _call, which reads _fn
                    if fn is not None and not _self_test(sgemm):
                        log.warning("blackmamba: MKL's cblas_sgemm_batch / sgemm_ failed their self-test; not used")
                        fn = None
                    _fn, _sgemm = fn, (sgemm if fn is not None else None)
                except OSError:
                    _fn, _sgemm = None, None
                _tried = True
    return _fn is not None


def sgemm_address() -> int:
    """The address of MKL's Fortran ``sgemm_`` (32-bit integers), for C kernels (``ops/cpu/csrc/grouped_mlp.cpp``)
    that call it on their own threads; MKL runs it single-threaded inside an OpenMP parallel region."""
    if not available():
        raise RuntimeError("MKL's sgemm_ is not available in this PyTorch build")
    return ctypes.cast(_sgemm, ctypes.c_void_p).value


def _ld(t: torch.Tensor) -> int:
    return max(t.stride(0), t.shape[1], 1)


def _call(groups) -> None:
    g = len(groups)
    if g == 0:
        return
    ints = _INT * g
    ptrs = _P * g
    floats = ctypes.c_float * g
    ta, tb, a, b, c, k = zip(*groups)
    m = [t.shape[0] for t in c]
    n = [t.shape[1] for t in c]
    _fn(_ROW_MAJOR, ints(*ta), ints(*tb), ints(*m), ints(*n), ints(*k), floats(*[1.0] * g),
        ptrs(*[t.data_ptr() for t in a]), ints(*[_ld(t) for t in a]),
        ptrs(*[t.data_ptr() for t in b]), ints(*[_ld(t) for t in b]),
        floats(*[0.0] * g), ptrs(*[t.data_ptr() for t in c]), ints(*[_ld(t) for t in c]),
        g, ints(*[1] * g))


def gemm_batch(groups: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor, int]]) -> None:
    """For each (trans_a, trans_b, a, b, c, k): c = op(a) @ op(b), op = transpose if TRANS.

    c (m, n) is written, never read. a, b and c are float32 CPU tensors with unit column stride (rows
    may be strided: slices of rows of one buffer are fine); op(a) is (m, k), op(b) is (k, n). k = 0
    writes zeros. Shapes are checked; the caller keeps the tensors alive (the call is synchronous).
    """
    if not available():
        raise RuntimeError("MKL's cblas_sgemm_batch is not available in this PyTorch build")
    for ta, tb, a, b, c, k in groups:
        for t in (a, b, c):
            if (t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2
                    or (t.shape[1] > 1 and t.stride(1) != 1)):
                raise ValueError("gemm_batch: operands must be 2-D float32 CPU tensors with unit column stride")
        ma, ka = (a.shape[1], a.shape[0]) if ta == TRANS else a.shape
        kb, nb = (b.shape[1], b.shape[0]) if tb == TRANS else b.shape
        if (ma, ka, kb, nb) != (c.shape[0], k, k, c.shape[1]):
            raise ValueError(f"gemm_batch: op(a) {(ma, ka)} @ op(b) {(kb, nb)} does not give c {tuple(c.shape)} "
                             f"with k={k}")
    for *_, c, k in groups:
        if k == 0:
            c.zero_()
    _call([grp for grp in groups if grp[5] > 0 and grp[4].numel() > 0])
