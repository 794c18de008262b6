"""Backend selection for the numerical ops.

Each op (``scan``, ``scan_step``, ``conv``) has one public function with one contract and several
implementations ("backends") registered here:

- ``reference``: plain PyTorch, the oracle every other backend is tested against;
- ``cpu``: fused C++ kernels for CPU tensors (compiled on first use);
- ``triton`` / ``cuda``: GPU kernels.

``auto`` (the default) picks the best available backend for the tensors' device. Override with
``blackmamba.ops.set_backend(name)`` or the ``BLACKMAMBA_BACKEND`` environment variable, or per call
with ``backend=``. The backend chosen for each (op, device type) is logged once.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

log = logging.getLogger("blackmamba")

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
# preference order for `auto`, per device type
_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_registry: dict[str, dict[str, tuple[Callable, Callable[[], bool], tuple[str, ...]]]] = {}
_override: str | None = None
_logged: set[tuple[str, str, str]] = set()


def register(op: str, backend: str, fn: Callable, available: Callable[[], bool] = lambda: True,
             devices: tuple[str, ...] = ("cpu", "cuda")) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op`` for the given device types."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS[1:])}")
    _registry.setdefault(op, {})[backend] = (fn, available, devices)


def set_backend(name: str | None) -> None:
    """Force a backend for every op (``None`` or ``"auto"``: automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    global _override
    _override = None if name in (None, "auto") else name


def requested_backend() -> str:
    if _override is not None:
        return _override
    env = os.environ.get("BLACKMAMBA_BACKEND", "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"BLACKMAMBA_BACKEND={env!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return env


def available_backends(op: str, device_type: str) -> list[str]:
    out = []
    for name, (_, available, devices) in _registry.get(op, {}).items():
        if device_type in devices and available():
            out.append(name)
    return out


def resolve(op: str, device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
    """Return (backend name, implementation) for ``op`` on ``device``."""
    want = backend or requested_backend()
    impls = _registry.get(op, {})
    dev = device.type
    if want == "auto":
        for name in _PREFERENCE.get(dev, ("reference",)):
            entry = impls.get(name)
            if entry is not None and dev in entry[2] and entry[1]():
                chosen = name
                break
        else:
            chosen = "reference"
    else:
        entry = impls.get(want)
        if entry is None or dev not in entry[2]:
            raise ValueError(f"backend {want!r} has no {op!r} implementation for {dev} tensors; "
                             f"available: {', '.join(available_backends(op, dev))}")
        if not entry[1]():
            raise RuntimeError(f"backend {want!r} for {op!r} is not available on this machine")
        chosen = want
    key = (op, dev, chosen)
    if key not in _logged:
        _logged.add(key)
        log.info("blackmamba: op %s on %s uses backend %s", op, dev, chosen)
    return chosen, impls[chosen][0]
