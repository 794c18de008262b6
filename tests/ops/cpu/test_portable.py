"""The kernels' portable code paths (no AVX-512: 8-lane vectors, the generic exp and bfloat16 widening),
built for x86-64-v3 with ``BLACKMAMBA_CPU_ARCH`` and held to the same parity tests as the native build,
in a subprocess (the library is loaded once per process)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from blackmamba.ops.cpu import build as cpu

HERE = Path(__file__).parent
KERNEL_TESTS = [HERE / "test_scan.py", HERE / "test_conv.py", HERE / "test_decode.py", HERE / "test_qgemv.py",
                HERE / "test_quant_step.py", HERE.parent / "test_norm.py"]


def _has_avx2() -> bool:
    try:
        return " avx2 " in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not _has_avx2(),
                    reason="x86-64-v3 (AVX2) code needs an x86-64 CPU with AVX2")
@pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the cpu backend is unavailable")
def test_portable_build_passes_the_kernel_parity_tests():
    env = {**os.environ, "BLACKMAMBA_CPU_ARCH": "x86-64-v3"}
    probe = ("from blackmamba.ops.cpu import build; lib = build.library(); assert lib is not None; "
             "print(lib.bm_vector_bytes())")
    width = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert width.returncode == 0, width.stderr[-2000:]
    assert width.stdout.strip() == "32", "the x86-64-v3 build should use 256-bit vectors"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                          *map(str, KERNEL_TESTS)], env=env, capture_output=True, text=True,
                         cwd=HERE.parents[2])
    # on a crash, the frames of ours from the fault handler's dump (the tail is pytest's own frames)
    ours = [ln for ln in run.stderr.splitlines() if "Fatal" in ln or ("File" in ln and "site-packages" not in ln)]
    assert run.returncode == 0, run.stdout[-3000:] + "\n".join(ours[:40]) + run.stderr[-1000:]
