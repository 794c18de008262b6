"""The one place that decides which implementation ("backend") of a numerical op runs.

Each op (``scan``, ``scan_step``, ``conv``, ``conv_step``, ``linear``, ``add_rmsnorm``, ``mamba_step``,
``moe_experts``, ``moe_step``) has one public function with one contract, in its own module under ``ops/``,
and implementations registered here:

- ``reference``: plain PyTorch, the oracle every other backend is tested against; registered for every device;
- ``cpu``: C++ kernels for CPU tensors (``ops/cpu``, compiled on first use);
- ``triton``: Triton kernels for CUDA tensors (``ops/triton``); under Triton's interpreter
  (``TRITON_INTERPRET=1``) also for CPU tensors, which is how their wiring is tested without a GPU.

The choice, per (op, device type): the backend asked for — ``blackmamba.ops.set_backend(name)``, else the
``BLACKMAMBA_BACKEND`` environment variable (read at the first op and by ``set_backend(None)``), else ``auto`` —
when it implements the op for that device (else the reference); ``auto`` takes the first available of
``PREFERENCE``. Choices are remembered: a decode step asks for a few ops per layer. A backend may still hand a call
it cannot take (a dtype or shape its kernel lacks, a gradient it does not compute, a LoRA-wrapped projection) to
the reference: that is part of its contract, and its tests cover both. ``-v`` on the command line logs each choice
once.

Binding: a decode step calls a few ops per layer with the same weights token after token. An op that has a
``bind_<op>(weights...)`` function returns its call with those operands fixed; a backend may register a ``bind``
of its own that checks the fixed operands and prepares what its kernel takes from them once (the cpu backend:
their addresses and dtype codes, the MoE experts' address tables), so that a call checks only what changes. A
binding keeps the backend chosen when it was made (a later ``set_backend`` applies to later bindings) and the
memory of the tensors it took addresses of (a weight replaced under its Parameter, by ``module.to`` say, leaves
it computing with the old values): make a new one when the weights change — once a generation
(``model.bind_step``). ``share_memory_()`` moves a storage in place, which no binding can follow: not while one
is in use.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

log = logging.getLogger("blackmamba")

BACKENDS = ("reference", "cpu", "triton")
PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")}

# op → backend → (implementation, available(), device types, bind or None)
_registry: dict[str, dict[str, tuple[Callable, Callable[[], bool], tuple[str, ...], Callable | None]]] = {}
_request: str | None = None  # the backend asked for; None until the first op reads the environment
_logged: set[tuple[str, str, str]] = set()
_resolved: dict[tuple[str, str, str], tuple[str, Callable]] = {}  # (op, device type, backend) → choice


def register(op: str, backend: str, fn: Callable, available: Callable[[], bool] = lambda: True,
             devices: tuple[str, ...] = ("cpu", "cuda"), bind: Callable | None = None) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op`` for the given device types; ``bind``, if
    given, takes the op's fixed operands and returns the call of ``fn`` with them fixed (see Binding above)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    _registry.setdefault(op, {})[backend] = (fn, available, devices, bind)
    _resolved.clear()


def set_backend(name: str | None) -> None:
    """Ask for one backend for every op that has it: a name, ``"auto"`` (the automatic choice), or ``None``
    (what ``BLACKMAMBA_BACKEND`` says now, else auto)."""
    global _request
    if name is None:
        _request = _from_environment()
    elif name == "auto" or name in BACKENDS:
        _request = name
    else:
        raise ValueError(f"unknown backend {name!r}; choose auto or one of {', '.join(BACKENDS)}")


def _from_environment() -> str:
    env = os.environ.get("BLACKMAMBA_BACKEND", "auto").strip().lower() or "auto"
    if env != "auto" and env not in BACKENDS:
        raise ValueError(f"BLACKMAMBA_BACKEND={env!r} is not a backend; choose auto or one of {', '.join(BACKENDS)}")
    return env


def requested_backend() -> str:
    global _request
    if _request is None:
        _request = _from_environment()
    return _request


def available_backends(op: str, device_type: str) -> list[str]:
    """The backends that implement ``op`` for ``device_type`` and can run on this machine."""
    return [name for name, (_, available, devices, _) in _registry.get(op, {}).items()
            if device_type in devices and available()]


def resolve(op: str, device: torch.device | torch.Tensor, backend: str | None = None) -> tuple[str, Callable]:
    """(backend name, implementation) of ``op`` for tensors on ``device`` (or on the tensor's device);
    ``backend`` overrides the request."""
    if isinstance(device, torch.device):
        dev = device.type
    else:
        dev = "cpu" if device.is_cpu else device.device.type  # is_cpu: no device object built
    want = backend or _request or requested_backend()
    hit = _resolved.get((op, dev, want))
    if hit is None:
        hit = _resolved[op, dev, want] = _choose(op, dev, want)
    return hit


def binder(op: str, device: torch.device | torch.Tensor,
           backend: str | None = None) -> tuple[str, Callable | None]:
    """(backend name, its ``bind`` or None) of ``op`` for tensors on ``device``, chosen as ``resolve`` chooses."""
    name, _ = resolve(op, device, backend)
    return name, _registry[op][name][3]


def _choose(op: str, dev: str, want: str) -> tuple[str, Callable]:
    impls = _registry[op]
    if want == "auto":
        chosen = next((name for name in PREFERENCE.get(dev, ()) if name in impls and dev in impls[name][2]
                       and impls[name][1]()), "reference")
    elif want in impls and dev in impls[want][2]:
        if not impls[want][1]():
            need = "a C++ compiler" if want == "cpu" else "pip install triton, and a GPU or TRITON_INTERPRET=1"
            raise RuntimeError(f"backend {want!r} for op {op!r} is not available on this machine (it needs {need})")
        chosen = want
    else:  # the backend asked for has no kernel for this op and device: the reference computes it
        chosen = "reference"
    if (op, dev, chosen) not in _logged:
        _logged.add((op, dev, chosen))
        log.info("blackmamba: op %s on %s uses backend %s", op, dev, chosen)
    return chosen, impls[chosen][0]
