"""Run the Triton kernels on CPU tensors under Triton's interpreter when no GPU is present.

Import this module before any ``blackmamba.ops.triton_*`` module: Triton decides at decoration time
whether ``@triton.jit`` compiles for the GPU or interprets (``TRITON_INTERPRET=1``). With a GPU the
same tests run the compiled kernels on CUDA tensors.

The interpreter evaluates ``tl.associative_scan`` with a user combine function one element at a time
in Python (about a millisecond per element), which would make the scan tests take many minutes.
``speed_up_interpreter`` replaces that loop with a Hillis-Steele scan that applies the same combine
function to whole arrays, log2(n) times: for an associative combine the same result up to rounding
(the compiled GPU scan also combines in a tree, not left to right).
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
    # Hillis-Steele: after the step with offset k every element holds the combination of the (up to) 2k
    # elements ending at it, earlier ones on the left — the same combine function, log2(n) whole-array
    # calls (rolled copies keep the power-of-two block shapes; the wrapped-around part is discarded)
    dtypes = [arg.dtype for arg in input]
    axis = self.axis
    cur = [arg.handle.data for arg in input]
    n = cur[0].shape[axis]
    shape = [1] * cur[0].ndim
    shape[axis] = n
    index = np.arange(n).reshape(shape)
    offset = 1
    while offset < n:
        earlier = [self.to_tensor(np.roll(c, offset, axis=axis), dt) for c, dt in zip(cur, dtypes)]
        later = [self.to_tensor(c, dt) for c, dt in zip(cur, dtypes)]
        ret = self.combine_fn.fn(*earlier, *later)
        ret = ret if isinstance(ret, tuple) else (ret,)
        cur = [np.where(index >= offset, r.handle.data, c).astype(c.dtype) for c, r in zip(cur, ret)]
        offset *= 2
    return [self.to_tensor(c, dt) for c, dt in zip(cur, dtypes)]


def speed_up_interpreter() -> None:
    if DEVICE != "cpu" or not HAS_TRITON:
        return
    from triton.runtime import interpreter

    if hasattr(interpreter, "ScanOps") and hasattr(interpreter.ScanOps, "generic_scan"):
        interpreter.ScanOps.generic_scan = _vectorised_generic_scan


speed_up_interpreter()
