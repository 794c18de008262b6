"""Replay: a run of the ``cpu`` backend's decode kernels, recorded once and then made again in one C call.

A token at batch 1 is some fifty kernel calls (per block ``add_rmsnorm``, then ``mamba_step`` or ``moe_step``);
between them runs Python — the bound ops' checks, their output allocations, ctypes' argument conversion — that
costs more than a tenth of the token on a two-core machine. What a CUDA graph does for a GPU, ``replayable``
does here:

    run = replayable(fn)      # fn(x, state) → tuple of tensors, made of bound decode ops (the model's block loop)
    out = run(x, state)       # the first call for a (state, x's shape and dtype): fn itself; the second: fn
                              # recorded; from then on replayed: x copied into the recorded input, one call of
                              # csrc/replay.cpp making the recorded kernel calls in order, the recorded outputs

A replay makes exactly the calls the recording made, with the same arguments — the same kernels, the bound
weights, the state's tensors (read and updated in place), the buffers allocated while recording, the same
thread counts — so its outputs are bit-identical to fn's. Every kernel call goes through ``launch``, which a
recording on the same thread notes; a replayable called inside a recording runs fn (its kernels are recorded).

Checked: while recording, a dispatch mode sees every torch op: one other than an allocation (a backend handing a
call to its reference, a copy, an attention cache growing), or a kernel csrc/replay.cpp does not make, refuses
the recording, and that state's steps run fn; at each replay, the state is the recorded one (the same tensor
objects, at the same addresses: ``State.select`` and ``State.cat`` make new ones, recorded anew; ``reset`` and
``put`` write in place and keep the recording) and torch's thread count is unchanged. Assumed (true of the
model's block loop, and not visible to a dispatch mode): fn has no effect but its kernel calls and torch ops —
no Python state it changes, no C code it calls other than through ``launch`` —, and its kernels read nothing but
their bound weights, x, the state and what the run allocates. The recording reads a copy of x (the caller's
tensor is never written); its outputs are the recording's buffers, overwritten by the next replay: use them
before calling again. Memory: each recording keeps the buffers of its run (for the model, about three (b, H)
vectors a block); ``MAX_RECORDINGS`` states are kept recorded per replayable function, the least recently
recorded dropped first.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .build import library

log = logging.getLogger("blackmamba")

REPLAY_CODE = {"bm_add_rmsnorm": 0, "bm_mamba_step": 1, "bm_moe_step": 2}  # csrc/replay.cpp Kernel
MAX_RECORDINGS = 16  # states kept recorded per replayable function (a server steps its groups in turn)
MAX_SEEN = 64  # states met once, remembered to be recorded at their next step

_local = threading.local()  # .calls: the list a recording running on this thread appends to


def launch(kernel, *args) -> int:
    """``kernel(*args)``: how every kernel of ops/cpu is called, so that a recording on this thread sees it."""
    calls = getattr(_local, "calls", None)
    if calls is not None:
        calls.append((kernel, args))
    return kernel(*args)


class _Watch(TorchDispatchMode):
    """Keeps the tensors a recorded run allocates and notes any other torch op it runs."""

    def __init__(self):
        super().__init__()
        self.made: list[torch.Tensor] = []
        self.other: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.empty.memory_format:
            self.made.append(out)
        elif func is torch.ops.aten.detach.default and any(args[0] is t for t in self.made):
            self.made.append(out)  # (a factory called under a dispatch mode returns its tensor detached)
        else:
            self.other.append(func)
        return out


def _slot(value, ctype) -> int:
    """One argument as csrc/replay.cpp reads it: an int64 holding the integer or address, or a float's bits."""
    if value is None:
        return 0
    if ctype is ctypes.c_float:
        return struct.unpack("<I", struct.pack("<f", value))[0]
    if isinstance(value, ctypes.Array):
        return ctypes.addressof(value)
    return int(value)


class _Recording:
    """The calls one run of fn made, as csrc/replay.cpp takes them, and what they point to."""

    def __init__(self, x, state, outputs, calls, made, lib):
        width = lib.bm_replay_max_args()

        class Call(ctypes.Structure):
            _fields_ = [("kernel", ctypes.c_int64), ("a", ctypes.c_int64 * width)]

        self.calls = (Call * len(calls))()
        for c, (kernel, args) in zip(self.calls, calls):
            c.kernel = REPLAY_CODE[kernel.__name__]
            c.a[:len(args)] = [_slot(v, t) for v, t in zip(args, kernel.argtypes, strict=True)]
        self.lib, self.failed = lib, ctypes.c_int64()
        self.held = calls  # the kernels and their arguments: the ctypes address tables the slots point into
        self.x, self.outputs, self.made = x, outputs, made  # made: every buffer the calls write, kept alive
        self.shape, self.dtype, self.threads = x.shape, x.dtype, torch.get_num_threads()
        self.state = weakref.ref(state)
        tensors = list(state.tensors())  # held weakly: a dropped state is never replayed into
        self.tensors = [(weakref.ref(t), t.data_ptr()) for t in tensors]

    def live(self, x: torch.Tensor, state) -> list | None:
        """The state's tensors if this recording replays (x, state) — the recorded state, its tensors the same
        objects at the same addresses, x of the recorded shape and dtype, torch's thread count the same —, else
        None."""
        if (x.shape != self.shape or x.dtype is not self.dtype or state is not self.state()
                or torch.get_num_threads() != self.threads):
            return None
        tensors = list(state.tensors())
        if len(tensors) != len(self.tensors):
            return None
        for t, (ref, address) in zip(tensors, self.tensors):
            if ref() is not t or t.data_ptr() != address:
                return None
        return tensors

    def replay(self, x: torch.Tensor, tensors: list) -> tuple:
        """The recorded calls made again on x (copied into the recorded input); ``tensors``, the state's, are held
        through the call (the GIL is released in it: another thread replacing one must not free it)."""
        self.x.copy_(x)
        rc = self.lib.bm_replay(ctypes.addressof(self.calls), len(self.calls), ctypes.byref(self.failed))
        if rc:
            raise RuntimeError(f"blackmamba cpu replay: recorded call {self.failed.value} failed (code {rc})")
        return self.outputs


class _Refused:
    """A state whose recording was refused: its steps run fn."""

    def __init__(self, state):
        self.state = weakref.ref(state)


def _record(fn, x, state):
    """fn(x, state) run once on a copy of x, and its recording (reading that copy: the caller's x is never written),
    or a _Refused (the reason logged) if it cannot be replayed."""
    with torch.inference_mode(False):  # a normal tensor: later replays copy into it whatever the mode then
        buffer = torch.empty(x.shape, dtype=x.dtype)  # (contiguous, as the kernels read it)
    buffer.copy_(x)
    watch, calls, outer = _Watch(), [], getattr(_local, "calls", None)
    _local.calls = calls
    try:
        with watch:
            outputs = fn(buffer, state)
    finally:
        _local.calls = outer
    made = watch.made
    if watch.other:
        why = f"it runs torch ops besides the kernels ({', '.join(sorted({str(f) for f in watch.other})[:3])})"
    elif not calls:
        why = "it calls no kernel"
    elif any(k.__name__ not in REPLAY_CODE for k, _ in calls):
        why = f"it calls a kernel a replay does not make ({', '.join(sorted({k.__name__ for k, _ in calls}))})"
    elif not (isinstance(outputs, tuple) and all(any(o is m for m in made) for o in outputs)):
        why = "its outputs are not tensors it allocates"
    else:
        return outputs, _Recording(buffer, state, outputs, calls, made, library())
    log.debug("blackmamba: a decode step of shape %s is not replayed: %s", tuple(x.shape), why)
    return outputs, _Refused(state)


class _Replayable:
    def __init__(self, fn: Callable):
        self.fn = fn
        self.recordings: dict = {}  # (id(state), shape, dtype) → _Recording or _Refused
        self.seen: dict = {}  # the keys met once: recorded at their next call
        self.lock = threading.Lock()

    def __call__(self, x: torch.Tensor, state) -> tuple:
        if not x.is_cpu or torch.is_grad_enabled() or getattr(_local, "calls", None) is not None:
            return self.fn(x, state)  # (inside a recording: its kernels are recorded, not a replay of them)
        key = (id(state), x.shape, x.dtype)
        rec = self.recordings.get(key)
        if rec is not None and rec.state() is state:
            if type(rec) is _Refused:
                return self.fn(x, state)
            tensors = rec.live(x, state)
            if tensors is not None:
                return rec.replay(x, tensors)
        elif key not in self.seen:  # (or a dropped state's key: an id met again)
            self._keep(self.seen, key, None, MAX_SEEN)
            return self.fn(x, state)
        if library() is None:
            return self.fn(x, state)
        outputs, rec = _record(self.fn, x, state)
        self._keep(self.recordings, key, rec, MAX_RECORDINGS)
        self.seen.pop(key, None)
        return outputs

    def _keep(self, table: dict, key, value, limit: int) -> None:
        with self.lock:
            table.pop(key, None)  # (re)inserted last: the oldest is dropped first
            table[key] = value
            while len(table) > limit:
                del table[next(iter(table))]


def replayable(fn: Callable) -> Callable:
    """fn(x, state) → tuple of tensors, recorded at its second call for a state and replayed from then on, where it
    can be (see the module docstring); the same outputs, computed without the Python between its kernels.
    ``BLACKMAMBA_CPU_REPLAY=0`` (read here, when a model's step is bound): fn itself."""
    if os.environ.get("BLACKMAMBA_CPU_REPLAY", "1").strip() == "0":
        return fn
    return _Replayable(fn)
