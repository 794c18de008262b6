"""Building and loading the CPU kernels (``ops/cpu/csrc``), and the table of their C signatures.

The C++ sources use no torch headers: on first use they are compiled (20-40 s) with the system C++ compiler
(``$CXX``, else ``c++``) into a shared library and called through ``ctypes`` on the tensors' memory. The library
is built for the host (``-march=native``; ``$BLACKMAMBA_CPU_ARCH`` names another target, e.g. ``x86-64-v3``)
and cached in a folder keyed on the sources, the flags, the compiler and the CPU's instruction-set flags, so
that a cache shared between machines never hands a binary to a CPU that cannot run it:

    $BLACKMAMBA_CACHE/kernels/,  else ~/.cache/blackmamba/kernels/

Concurrent first uses (threads, pytest processes) are safe: each build compiles the sources in parallel in a
private folder and renames the library into place. If the build fails, one warning is issued and ``auto``
uses the ``reference`` backend.
"""

from __future__ import annotations

import ctypes
import functools
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

import torch

log = logging.getLogger("blackmamba")

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("scan_forward.cpp", "scan_backward.cpp", "conv.cpp", "step.cpp", "mamba_step.cpp", "gemv.cpp",
           "qgemv.cpp", "norm.cpp", "fastexp.cpp", "grouped_mlp.cpp", "moe_step.cpp",
           "replay.cpp")
HEADERS = ("simd.h", "dot.h", "scan.h", "act.h")
# -march: the host's (native) unless BLACKMAMBA_CPU_ARCH names another target, e.g. x86-64-v3 (AVX2, the
# portable code paths) to test them on an AVX-512 machine or to build for an older CPU
CFLAGS = ("-O3", "-ffp-contract=fast", "-fopenmp", "-std=c++20", "-shared", "-fPIC")

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2}
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what the decode kernels take
MAX_ROWS = 8  # csrc/dot.h kDotMaxRows: the most sequences a decode kernel takes; checked when the library loads

_lock = threading.Lock()
_lib = None
_tried = False


# --------------------------------------------------------------------------- build
def _flags() -> tuple[str, ...]:
    flags = (f"-march={os.environ.get('BLACKMAMBA_CPU_ARCH', '').strip() or 'native'}", *CFLAGS)
    # clang ignores `#pragma clang fp contract(off)` (csrc/dot.h) under plain -ffp-contract=fast
    if _is_clang(_compiler()):
        flags = tuple("-ffp-contract=fast-honor-pragmas" if f == "-ffp-contract=fast" else f for f in flags)
    return flags


@functools.lru_cache(maxsize=None)
def _is_clang(compiler: str) -> bool:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" in out.lower()


def cpu_info(path: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields of Linux's /proc/cpuinfo ("model name", "flags", ...); {} elsewhere."""
    info: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block ends at a blank line
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def _cpu_signature() -> str:
    """The host's instruction-set flags: a -march=native binary is only reused on a match."""
    info = cpu_info()
    flags = info.get("flags") or info.get("Features")  # x86, ARM
    if flags:
        return f"flags: {flags}"
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




# --------------------------------------------------------------------------- ABI
class ScanTensors(ctypes.Structure):
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
    "bm_scan_forward": (_INT, [ctypes.POINTER(ScanTensors), _P, _P, _P, _I64, _INT]),
    "bm_scan_backward": (_INT, [ctypes.POINTER(ScanTensors)] + [_P] * 11 + [_I64, _INT]),
    "bm_conv_forward": (_INT, [_INT, _P, _I64, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT]),
    "bm_conv_backward": (_INT, [_INT, _P, _I64, _I64] + [_P] * 8 + [_I64, _I64, _I64, _I64, _INT]),
    "bm_ssm_step": (None, [_P] * 9 + [_I64, _I64, _I64, _INT]),
    "bm_conv_step": (_INT, [_INT] + [_P] * 5 + [_I64, _I64, _I64, _INT]),
    "bm_mamba_step_max_rows": (_INT, []),
    # ..., threads, then the projections' quant code (0 plain, 1 int8, 2 int4), their three scales, group
    "bm_mamba_step": (_INT, [_INT, _INT, _INT] + [_P] * 13 + [_I64] * 6 + [_INT, _INT, _P, _P, _P, _I64]),
    "bm_gemv_max_rows": (_INT, []),
    "bm_gemv": (_INT, [_INT, _P, _P, _P, _P, _I64, _I64, _I64, _INT]),
    "bm_qgemv": (_INT, [_INT, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT]),
    "bm_add_rmsnorm": (_INT, [_INT, _INT, _INT, _P, _P, _P, _P, _P, _I64, _I64, ctypes.c_float, _INT]),
    "bm_exp": (None, [_P, _P, _I64, _INT]),
    "bm_grouped_mlp_forward": (_INT, [_P, _INT, _I64, _P, _I64, _I64] + [_P] * 5 + [_INT]),
    "bm_grouped_mlp_backward": (_INT, [_P, _INT, _I64, _P, _I64, _I64] + [_P] * 8 + [_INT]),
    # ..., threads, then the experts' quant code (0 plain, 1 int8, 2 int4), fc1 / fc2 scale-pointer arrays, group
    "bm_moe_step": (_INT, [_INT, _INT, _INT, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT,
                           _INT, _P, _P, _I64]),
    # a recorded run of the calls above (ops/cpu/replay.py): the calls, their count, where the failing index goes
    "bm_replay_max_args": (_INT, []),
    "bm_replay": (_INT, [_P, _I64, _P]),
}




# --------------------------------------------------------------------------- load
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
                if lib.bm_mamba_step_max_rows() != MAX_ROWS:
                    raise RuntimeError("ops/cpu/build.py MAX_ROWS disagrees with csrc/dot.h kDotMaxRows")
                _lib = lib
            except Exception as e:  # no compiler, unsupported flags or platform, unwritable cache, ...
                warnings.warn(f"blackmamba: fused CPU kernels unavailable ({e}); using the reference PyTorch ops",
                              RuntimeWarning, stacklevel=3)
                log.debug("blackmamba: CPU kernel build failed", exc_info=True)
            _tried = True
    return _lib


def available() -> bool:
    return library() is not None



def ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def threads_for(work: int) -> int:
    """torch's thread count, or 1 for work (state updates) too small to repay waking the others."""
    return torch.get_num_threads() if work >= 1 << 16 else 1


def grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
