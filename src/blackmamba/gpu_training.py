"""Training on a GPU: bf16 autocast over fp32 master weights, fused AdamW, activation checkpointing.

The pieces a trainer needs for ``--device cuda``:

    model = prepare_for_gpu_training(model, "cuda", activation_checkpointing=False)
    opt = fused_adamw(param_groups, lr=..., betas=(0.9, 0.95), weight_decay=...)
    with autocast(device):
        loss = model(ids, targets=targets).loss      # matmuls in bf16, SSM scan in fp32
    loss.backward(); opt.step()

- The weights stay fp32 (the optimizer updates fp32 master weights; no loss scaling is needed with
  bf16). ``A_log`` and ``D`` are fp32 like every weight, and the scan always accumulates in fp32.
- ``fused_adamw`` is ``torch.optim.AdamW(fused=True)``: one kernel updates all parameters.
- Activation checkpointing recomputes each mixer in the backward instead of keeping its
  activations (the in_proj output, conv, scan internals, the experts' hidden layer): less memory for
  about one extra forward. It changes no parameter names, so checkpoints are unaffected.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint


def autocast(device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; no-op elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fused_adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused implementation (one kernel for all parameters; CUDA and CPU)."""
    return torch.optim.AdamW(params, fused=True, **kwargs)


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(base: type) -> type:
    """A subclass of the mixer class whose forward is recomputed in the backward."""
    if base in _CHECKPOINTED:
        return _CHECKPOINTED[base]

    def forward(self, h, state=None, mask=None):
        if state is None and torch.is_grad_enabled():
            return checkpoint(base.forward, self, h, state=None, mask=mask, use_reentrant=False)
        return base.forward(self, h, state=state, mask=mask)

    name = f"Checkpointed{base.__name__}"
    cls = type(name, (base,), {"forward": forward, "__module__": __name__, "__qualname__": name})
    globals()[name] = cls  # importable by name, so a pickled model loads again
    _CHECKPOINTED[base] = cls
    return cls


def enable_activation_checkpointing(model) -> None:
    """Recompute every block's mixer in the backward pass (idempotent)."""
    for blk in model.decoder.layers:
        if type(blk.mixer) not in _CHECKPOINTED.values():
            blk.mixer.__class__ = _checkpointed_class(type(blk.mixer))


def prepare_for_gpu_training(model, device="cuda", activation_checkpointing: bool = False):
    """Move ``model`` to ``device`` keeping fp32 master weights; optionally enable checkpointing."""
    low = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if low:
        raise ValueError(f"the model holds {', '.join(low)} weights: train with fp32 master weights "
                         "(load with dtype=torch.float32) and let autocast run the matmuls in bf16")
    model.to(device)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model
