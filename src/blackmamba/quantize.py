"""Weight-only quantization of a model for inference, applied from outside the model code (as parallelism and
activation checkpointing are): ``quantize_model`` replaces the linear layers that hold the bytes a token reads
with ``layers.quantized.QuantizedLinear``.

Quantized: every Mamba mixer's in_proj, x_proj and out_proj, every MLP's and expert's linear_fc1 and
linear_fc2, every attention layer's qkv_proj and out_proj, and (``head=True``, the default) the LM head — for
tied embeddings a quantized copy of the embedding matrix that only the head reads. The embedding table itself
only when asked (``embedding=True``; a tied head then reads the quantized table, no copy). Kept as they are:
dt_proj, the conv, A_log and D, the norms, the routers and the recurrent state.

A quantized model saves as a native folder (config.json, model.safetensors) plus ``quantization.json``
(``{"mode", "group_size", "head", "embedding"}``); each quantized layer's weight is stored as two tensors,
``<layer>.weight_q`` (int8 (o, i), or uint8 (o, ceil(i/2)) holding two 4-bit values a byte) and
``<layer>.weight_scales`` (float32 (o,), or float16 (o, ceil(i/group_size))) — the layout of ``ops.quant``.
``read_model`` rebuilds the structure from quantization.json and loads the stored bytes as they are: no
re-quantizing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .layers.quantized import QuantizedEmbedding, QuantizedLinear
from .ops.quant import MODES

QUANTIZATION_NAME = "quantization.json"
GROUP_SIZES = (32, 64)
# per layer kind: the mixer's linear layers that are quantized
TARGETS = {"mamba": ("in_proj", "x_proj", "out_proj"), "mlp": ("linear_fc1", "linear_fc2"),
           "attention": ("qkv_proj", "out_proj")}


@dataclass(frozen=True)
class Quantization:
    """How a model's weights are quantized (what quantization.json holds)."""

    mode: str  # "int8" | "int4"
    group_size: int = 32  # int4: inputs per scale
    head: bool = True  # the LM head too
    embedding: bool = False  # the embedding table too (a tied head then reads it: no copy)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"quantize = {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.mode == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size = {self.group_size!r}: int4 groups of {' or '.join(map(str, GROUP_SIZES))} "
                             f"inputs")
        for name in ("head", "embedding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} = {getattr(self, name)!r}: true or false")

    def to_dict(self) -> dict:
        return asdict(self)

    def mismatch(self, mode: str, group_size: int, embedding: bool = False) -> str | None:
        """What differs between these stored weights and a request to quantize (``mode``, ``group_size``,
        ``embedding``) — stored weights are never re-quantized —, or None where the request describes them."""
        if mode != self.mode:
            return f"{self.mode} weights, not {mode}"
        if mode == "int4" and group_size != self.group_size:
            return f"int4 weights in groups of {self.group_size}, not {group_size}"
        if embedding and not self.embedding:
            return "weights quantized without the embedding table"
        return None

    @classmethod
    def from_dict(cls, d: dict) -> "Quantization":
        if not isinstance(d, dict) or "mode" not in d or set(d) - {"mode", "group_size", "head", "embedding"}:
            raise ValueError(f"expected {{\"mode\", \"group_size\", \"head\", \"embedding\"}}, got {d!r}")
        return cls(**d)


def _targets(model) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every linear layer ``quantize_model`` replaces, the head excepted."""
    out = []
    for blk in model.decoder.layers:
        mixer = blk.mixer
        if blk.kind == "moe":
            out += [(e, name) for e in mixer.local_experts for name in TARGETS["mlp"]]
        else:
            out += [(mixer, name) for name in TARGETS[blk.kind]]
    return out


def _check_quantizable(model) -> None:
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"the model is already quantized ({model.quantization.mode})")
    if not hasattr(model, "decoder"):
        raise ValueError(f"quantize_model takes a BlackMambaLM, not {type(model).__name__}")


@torch.no_grad()
def quantize_model(model, mode: str, group_size: int = 32, head: bool = True, embedding: bool = False):
    """Replace ``model``'s linear layers (see the module docstring) with quantized ones, in place, one at a time
    (each full-precision weight is released as its quantized copy is made); ``embedding``: the embedding table
    too. Returns the model, in eval mode, with ``model.quantization`` set. Inference only: a quantized model has
    no gradients to train."""
    _check_quantizable(model)
    q = Quantization(mode, group_size, head, embedding)
    targets = _targets(model)
    for parent, name in targets:  # every check before the first change: no half-quantized model
        lin = getattr(parent, name)
        if type(lin) is not nn.Linear or lin.bias is not None:
            raise ValueError(f"{name}: only bias-free nn.Linear layers are quantized, found {type(lin).__name__} "
                             f"(a LoRA-wrapped model: merge the adapters first)")
    weights = [getattr(parent, name).weight for parent, name in targets]
    weights += [model.embedding.word_embeddings.weight] + ([] if model.output_layer is None
                                                            else [model.output_layer.weight])
    if not all(bool(torch.isfinite(w).all()) for w in weights):
        raise ValueError("the model has non-finite weights (a diverged checkpoint?): they cannot be quantized")
    del weights, lin  # held to the end, they would outlive release_freed_memory below
    for parent, name in targets:
        setattr(parent, name, QuantizedLinear.from_weight(getattr(parent, name).weight, mode, group_size))
    tied = model.output_layer is None
    if head and not (tied and embedding):  # (a tied head reads the quantized table itself)
        weight = model.embedding.word_embeddings.weight if tied else model.output_layer.weight
        model.output_layer = QuantizedLinear.from_weight(weight, mode, group_size)
    if embedding:
        model.embedding.word_embeddings = QuantizedEmbedding.from_weight(model.embedding.word_embeddings.weight,
                                                                         mode, group_size)
    for p in model.parameters():
        p.requires_grad_(False)
    model.quantization = q
    release_freed_memory()
    return model.eval()


def release_freed_memory() -> bool:
    """Hand the memory of the released full-precision weights back to the operating system (glibc's
    ``malloc_trim``): freed heap blocks amid live ones otherwise stay in the process's resident set, and a
    quantized model would keep the footprint of the one it was made from. False where not glibc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def quantized_structure(model, q: Quantization):
    """Give ``model`` (built on the meta device) the quantized layers ``q`` describes, empty, so that a quantized
    checkpoint's tensors load into them as stored; returns the model."""
    _check_quantizable(model)
    for parent, name in _targets(model):
        lin = getattr(parent, name)
        setattr(parent, name, QuantizedLinear(lin.in_features, lin.out_features, q.mode, q.group_size,
                                              device="meta"))
    H, V = model.config.hidden_size, model.config.padded_vocab_size
    if q.head and not (model.output_layer is None and q.embedding):
        model.output_layer = QuantizedLinear(H, V, q.mode, q.group_size, device="meta")
    if q.embedding:
        model.embedding.word_embeddings = QuantizedEmbedding(H, V, q.mode, q.group_size, device="meta")
    for p in model.parameters():
        p.requires_grad_(False)
    model.quantization = q
    return model


def is_quantized_tensor(name: str) -> bool:
    """Whether a state-dict key holds a quantized layer's bytes or scales (never cast to another dtype)."""
    return name.endswith((".weight_q", ".weight_scales"))
