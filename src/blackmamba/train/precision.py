"""Mixed precision and activation checkpointing, applied to the model from outside (the model code knows neither).

- ``autocast(device, precision)``: bf16 autocast on CUDA (``auto``), fp32 on CPU (``auto``: bf16 matmuls are slower
  there on most CPUs). The weights stay fp32 (the optimizer updates fp32 master weights; bf16 needs no loss scaling);
  the scan accumulates in fp32 whatever its inputs' dtype.
- ``enable_activation_checkpointing(model)``: each block is wrapped (PyTorch's ``checkpoint_wrapper``, as
  torchtitan applies it) so that its forward is recomputed in the backward instead of keeping its activations (the
  in_proj output, conv, scan internals, the experts' hidden layer): less memory for about one extra forward. The
  wrapper keeps the state dict's keys, so checkpoints are unaffected; a block's ``step`` is not wrapped.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl, CheckpointWrapper,
                                                                         checkpoint_wrapper)

PRECISIONS = ("auto", "fp32", "bf16")


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether ``precision`` (one of PRECISIONS) means bf16 autocast on ``device``."""
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (one of PRECISIONS) on ``device``."""
    device = torch.device(device)
    if uses_bf16(device, precision):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def enable_activation_checkpointing(model) -> None:
    """Recompute every block in the backward (idempotent)."""
    layers = model.decoder.layers
    for i, blk in enumerate(layers):
        if not isinstance(blk, CheckpointWrapper):
            layers[i] = checkpoint_wrapper(blk, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
