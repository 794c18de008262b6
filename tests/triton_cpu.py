"""Run the Triton kernels on CPU tensors under Triton's interpreter when no GPU is present.

Import this module before any ``blackmamba.ops.triton_*`` module: Triton decides at decoration time
whether ``@triton.jit`` compiles for the GPU or interprets (``TRITON_INTERPRET=1``). With a GPU the
same tests run the compiled kernels on CUDA tensors.

The interpreter evaluates ``tl.associative_scan`` with a user combine function one element at a time
in Python (about a millisecond per element), which would make the scan tests take minutes. ``speed_up``
replaces that loop with one that walks the scan axis and applies the same combine function to whole
slices: the same sequential order of combines along the axis, vectorised across the other axes.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def _vectorised_generic_scan(self, input):
    datas = [arg.handle.data for arg in input]
    dtypes = [arg.dtype for arg in input]
    axis = self.axis
    outs = [np.empty_like(d) for d in datas]

    def part(arrays, i):
        return [self.to_tensor(np.take(a, [i], axis=axis), dt) for a, dt in zip(arrays, dtypes)]

    acc = part(datas, 0)
    for j, a in enumerate(acc):
        np.put_along_axis(outs[j], np.zeros_like(a.handle.data, dtype=np.int64), a.handle.data, axis=axis)
    for i in range(1, datas[0].shape[axis]):
        ret = self.combine_fn.fn(*acc, *part(datas, i))
        acc = list(ret) if isinstance(ret, tuple) else [ret]
        for j, a in enumerate(acc):
            np.put_along_axis(outs[j], np.full(a.handle.data.shape, i, dtype=np.int64), a.handle.data, axis=axis)
    return [self.to_tensor(o, dt) for o, dt in zip(outs, dtypes)]


def speed_up_interpreter() -> None:
    if DEVICE != "cpu" or not HAS_TRITON:
        return
    from triton.runtime import interpreter

    if hasattr(interpreter, "ScanOps") and hasattr(interpreter.ScanOps, "generic_scan"):
        interpreter.ScanOps.generic_scan = _vectorised_generic_scan


speed_up_interpreter()
