"""Numerical ops, each with one contract and several backends (see ``ops.backend``)."""

from . import gpu as _gpu  # noqa: F401  (registers the triton backends)
from .backend import available_backends, requested_backend, set_backend
from .conv import causal_conv1d, causal_conv1d_step
from .grouped_mlp import grouped_mlp
from .linear import linear
from .mamba_step import mamba_step
from .norm import add_rmsnorm
from .scan import selective_scan, selective_scan_reference, selective_scan_step
from .sinkhorn import sinkhorn
from . import cpu  # noqa: F401  (registers the fused CPU kernels as backend "cpu"; built on first use)

__all__ = [
    "add_rmsnorm", "available_backends", "requested_backend", "set_backend", "causal_conv1d", "causal_conv1d_step",
    "grouped_mlp", "linear", "mamba_step", "selective_scan", "selective_scan_reference", "selective_scan_step",
    "sinkhorn",
]
