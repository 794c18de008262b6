"""The ``cpu`` backend: C++ kernels for CPU tensors (``csrc/``), compiled on first use (``build``) and registered
with the op registry by the wrapper modules: ``scan`` (scan, scan_step), ``conv`` (conv, conv_step), ``decode``
(mamba_step, moe_step, linear, add_rmsnorm) and ``grouped_mlp`` (moe_experts, through PyTorch's own MKL)."""

from . import conv, decode, grouped_mlp, scan  # noqa: F401  (register the backends)
from .build import available, library

__all__ = ["available", "library"]
