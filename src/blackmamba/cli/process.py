"""Process settings the ``blackmamba`` command applies at its entry, before any subcommand imports torch.

- Transparent huge pages for CPU tensors of 2 MB and more (``THP_MEM_ALLOC_ENABLE=1``, as NumPy does by default):
  PyTorch reads the variable once, at its first allocation. Fewer page faults and less system time on training
  (docs/benchmarks.md). ``THP_MEM_ALLOC_ENABLE=0`` in the environment turns it off.
- glibc's malloc (Linux), where PyTorch gets CPU memory: blocks under 32 MB come from the heap, and up to 256 MB of
  freed heap is kept for the next allocation instead of being handed back to the kernel. Left to its defaults,
  glibc returns freed memory early and maps it afresh, so a tensor of a few MB allocated in every step (a scan's
  output, an MoE layer's buffers) is faulted in again, page by page, on every call. Setting glibc's own malloc
  variables (GLIBC_TUNABLES with glibc.malloc.*, MALLOC_*_) leaves malloc as they say.

``import blackmamba`` changes neither: a library leaves its host process alone.
"""

from __future__ import annotations

import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MALLOC_SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 256 << 20}


def tune_malloc(environ=os.environ, libc=None) -> bool:
    """Apply MALLOC_SETTINGS through glibc's mallopt; False where not glibc or the environment sets malloc."""
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in environ):
        return False
    if libc is None:
        if not sys.platform.startswith("linux"):
            return False
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:  # musl and others: their own malloc
            return False
    mallopt = getattr(libc, "mallopt", None)
    return mallopt is not None and all(mallopt(k, v) == 1 for k, v in MALLOC_SETTINGS.items())


def prepare() -> None:
    """The command's process settings (see the module docstring); call before torch is imported."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    tune_malloc()
