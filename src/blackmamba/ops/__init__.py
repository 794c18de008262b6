"""Numerical ops: one public function and one contract per op (a module each, its reference beside it), and
their backends — ``cpu`` (C++ kernels, ``ops/cpu``) and ``triton`` (``ops/triton``) — chosen by the one registry
(``ops.registry``; ``set_backend`` or ``BLACKMAMBA_BACKEND`` to override). ``replayable``: a run of bound decode ops
recorded once and replayed in one call (``ops/cpu/replay.py``, the CPU's analogue of a CUDA graph)."""

from .activations import ACTIVATIONS
from .conv import causal_conv1d, causal_conv1d_step
from .linear import linear
from .mamba_step import bind_mamba_step, mamba_step
from .moe import bind_moe_step, moe_experts, moe_step
from .norm import add_rmsnorm, bind_add_rmsnorm
from .registry import available_backends, requested_backend, set_backend
from .scan import selective_scan, selective_scan_reference, selective_scan_step
from .sinkhorn import sinkhorn
from . import cpu, triton  # noqa: E402,F401  (register the backends; nothing is compiled or imported yet)
from .cpu.replay import replayable  # noqa: E402

__all__ = [
    "ACTIVATIONS", "add_rmsnorm", "available_backends", "bind_add_rmsnorm", "bind_mamba_step", "bind_moe_step",
    "causal_conv1d", "causal_conv1d_step", "linear", "mamba_step",
    "moe_experts", "moe_step", "replayable", "requested_backend", "selective_scan", "selective_scan_reference",
    "selective_scan_step", "set_backend", "sinkhorn",
]
