"""Weight-only quantized linear layers: the storage format and its reference (dequantize).

    qw = quantize_weight(weight, "int8")                 # weight (o, i) float → QuantizedWeight
    qw = quantize_weight(weight, "int4", group_size=32)
    y = linear(x, qw, bias)                              # op ``linear``: F.linear(x, qw.dequantize(), bias)

Symmetric round-to-nearest, no zero point:

- ``int8``: ``q`` int8 (o, i), values in [-127, 127]; ``scales`` float32 (o,), one per output row,
  ``max|row| / 127``. W[r, k] ≈ q[r, k] · scales[r].
- ``int4``: ``q`` uint8 (o, ceil(i / 2)): element k of a row in byte k // 2, the low nibble for even k and the
  high nibble for odd k, each stored as value + 8 (a nibble n is the value n - 8, so -8..7; ``quantize_weight``
  writes -7..7, and 0 for the unused high nibble of an odd row); ``scales`` float16 (o, ceil(i / group_size)),
  one per group of ``group_size`` consecutive inputs of a row (the last group may be partial), ``max|group| / 7``
  computed in float32 and stored as float16 (raised by one float16 step where rounding took it below
  max|group| / 7, so that no value needs clamping); the values are quantized with the stored scale, so
  W[r, k] ≈ (n - 8) · scales[r, k // group_size], exactly what ``dequantize`` returns.

An all-zero row or group has scale 0 and values 0.

The product: ``linear(x, qw)`` is ``F.linear(x', qw.dequantize())``, where x' = ``product_input(x, qw)`` is x
quantized by ``quantize_activation``: for ``int4`` to int8 per group of the weight's ``group_size`` inputs (one
float32 scale ``max|group| / 127`` each; llama.cpp's Q4_0 · Q8_0), for ``int8`` to int16 per group of
``INT8_X_GROUP`` inputs (scale ``max|group| / 32767``: a rounding 256 times finer than the weights' own). Integer
x is what makes quantized decoding fast on CPUs without float16 arithmetic: the products become exact integer
multiply-adds (csrc/dot.h: int4 · int8 bytes with ``vpmaddubsw``, int8 · int16 with ``vpmaddwd``), a third of the
instructions of widening every weight to float32. A QuantizedWeight is not a tensor: the ``cpu`` backend of
``linear`` multiplies by it directly (csrc/qgemv.cpp, the weights read as stored); every other backend computes
that ``F.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = ("int8", "int4")
INT8_X_GROUP = 128  # an int8 product's x is quantized to int16 per this many inputs (csrc/dot.h kInt8XGroup)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A linear layer's weight W (o, i) stored quantized; W ≈ dequantize()."""

    mode: str  # "int8" | "int4"
    q: torch.Tensor  # int8: int8 (o, i); int4: uint8 (o, ceil(i / 2)), two values a byte (see the module doc)
    scales: torch.Tensor  # int8: float32 (o,); int4: float16 (o, ceil(i / group_size))
    in_features: int  # i
    group_size: int = 0  # int4: inputs per scale (even, >= 2); int8: 0

    def __post_init__(self):
        # a layer may build one per call (decoding: a few a layer a token), so the valid case is checked quickly
        q, s, i, g = self.q, self.scales, self.in_features, self.group_size
        try:
            o = q.shape[0]
            if self.mode == "int8":
                ok = (q.dtype is torch.int8 and s.dtype is torch.float32 and g == 0 and type(i) is int and i >= 1
                      and q.shape == (o, i) and s.shape == (o,))
            else:
                ok = (self.mode == "int4" and q.dtype is torch.uint8 and s.dtype is torch.float16 and type(g) is int
                      and g >= 2 and g % 2 == 0 and type(i) is int and i >= 1 and q.shape == (o, (i + 1) // 2)
                      and s.shape == (o, -(-i // g)))
            ok = ok and o >= 1 and s.device == q.device
        except (AttributeError, IndexError, TypeError):
            ok = False
        if not ok:
            self._refuse()
        # what a CPU kernel asks of it, checked once (a decode step asks it of every expert of every layer):
        # (mode, group_size, o, i) for contiguous CPU tensors, else None. A tensor's device and layout stay.
        key = ((self.mode, g, o, i) if q.device.type == "cpu" and q.is_contiguous() and s.is_contiguous()
               else None)
        object.__setattr__(self, "kernel_key", key)

    def _refuse(self):
        """Raise the ValueError that says what is wrong."""
        if self.mode not in MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r}; choose one of {', '.join(MODES)}")
        i, q, s = self.in_features, self.q, self.scales
        if type(i) is not int or i < 1:
            raise ValueError(f"in_features must be a positive int, not {i!r}")
        if not torch.is_tensor(q) or not torch.is_tensor(s) or q.dim() != 2 or q.shape[0] < 1:
            raise ValueError("q must be a 2-D tensor (o, ...) with o >= 1, and scales a tensor")
        o = q.shape[0]
        if self.mode == "int8":
            if self.group_size != 0:
                raise ValueError(f"int8 has one scale per row: group_size must be 0, not {self.group_size!r}")
            want = ((torch.int8, (o, i)), (torch.float32, (o,)))
        else:
            _check_group(self.group_size)
            want = ((torch.uint8, (o, (i + 1) // 2)), (torch.float16, (o, -(-i // self.group_size))))
        for name, t, (dtype, shape) in zip(("q", "scales"), (q, s), want):
            if t.dtype is not dtype or tuple(t.shape) != shape:
                raise ValueError(f"{self.mode} {name} must be {dtype} of shape {shape}, "
                                 f"not {t.dtype} of shape {tuple(t.shape)}")
        raise ValueError(f"q and scales are on different devices ({q.device}, {s.device})")

    @property
    def shape(self) -> torch.Size:
        """(o, i): the shape of the weight this stands for."""
        return torch.Size((self.q.shape[0], self.in_features))

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        """Bytes of storage: q and scales (what a matrix-vector product reads)."""
        return self.q.numel() * self.q.element_size() + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W (o, i) in ``dtype``: each value times its scale in float32 (exact for int4), then cast."""
        if self.mode == "int8":
            w = self.q.float() * self.scales[:, None]
        else:
            o, i, g = self.q.shape[0], self.in_features, self.group_size
            n = torch.stack((self.q & 0xF, self.q >> 4), dim=-1).reshape(o, -1)[:, :i]
            s = self.scales.float().repeat_interleave(g, dim=1)[:, :i]
            w = (n.float() - 8) * s
        return w.to(dtype)

    def __repr__(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"QuantizedWeight({self.mode}, shape={tuple(self.shape)}{group}, device={self.device})"


def _check_group(group_size) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group_size must be an even int >= 2 (32 or 64 are usual), not {group_size!r}")


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, mode: str, group_size: int = 32) -> QuantizedWeight:
    """Quantize a linear layer's weight (o, i) symmetrically, round to nearest: ``int8`` with one float32 scale
    per row (``group_size`` is ignored), ``int4`` with one float16 scale per ``group_size`` inputs of a row."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if not torch.is_tensor(weight) or weight.dim() != 2 or not weight.is_floating_point() or 0 in weight.shape:
        raise ValueError(f"weight must be a non-empty 2-D floating-point tensor (o, i), not "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} of shape "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("weight has non-finite values: they cannot be quantized")
    o, i = w.shape
    if mode == "int8":
        scale = w.abs().amax(dim=1) / 127
        q = torch.round(w / torch.where(scale > 0, scale, 1)[:, None]).clamp_(-127, 127)
        return QuantizedWeight("int8", q.to(torch.int8).contiguous(), scale.contiguous(), i, 0)
    _check_group(group_size)
    groups = -(-i // group_size)
    padded = torch.zeros(o, groups * group_size, dtype=torch.float32, device=w.device)
    padded[:, :i] = w
    padded = padded.view(o, groups, group_size)
    amax = padded.abs().amax(dim=2)
    scale = (amax / 7).to(torch.float16)
    if scale.isinf().any():
        raise ValueError("int4 scales overflow float16: weights above 7 * 65504 in magnitude")
    low = scale.float() * 7 < amax  # rounded below max/7 (or to 0): one float16 step up, so |w / scale| <= 7
    scale = torch.where(low, (scale.view(torch.int16) + 1).view(torch.float16), scale)
    sf = scale.float()
    v = torch.round(padded / torch.where(sf > 0, sf, 1)[:, :, None]).clamp_(-7, 7)
    n = (v.reshape(o, -1)[:, :i] + 8).to(torch.uint8)
    if i % 2:
        n = torch.cat((n, torch.full((o, 1), 8, dtype=torch.uint8, device=w.device)), dim=1)
    q = n[:, 0::2] | (n[:, 1::2] << 4)
    return QuantizedWeight("int4", q.contiguous(), scale.contiguous(), i, group_size)


def quantize_activation(x: torch.Tensor, group_size: int, levels: int = 127) -> torch.Tensor:
    """x (..., i) quantized as a quantized product quantizes it (csrc/dot.h's quantize_groups, the same
    arithmetic): per group of ``group_size`` consecutive inputs (the last may be partial) a float32 scale
    d = max|x| / levels and values round-half-even(x / d) in [-levels, levels] (0 where d is 0); returns those
    values times d, in x's dtype. ``levels``: 127 (int8 values, int4 products) or 32767 (int16, int8 products).
    The gradient passes through unchanged (a straight-through estimator: rounding would zero it)."""
    xf = x.float()
    i = xf.shape[-1]
    groups = -(-i // group_size)
    padded = F.pad(xf, (0, groups * group_size - i)).unflatten(-1, (groups, group_size))
    d = padded.abs().amax(dim=-1, keepdim=True) / levels
    q = torch.round(padded / torch.where(d > 0, d, 1)).clamp_(-levels, levels)
    xq = (q * d).flatten(-2)[..., :i].to(x.dtype)
    return x + (xq - x).detach() if x.requires_grad else xq


def product_input(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x as a product with ``weight`` multiplies it (see the module docstring): int4: quantized to int8 per
    weight group; int8: to int16 per ``INT8_X_GROUP`` inputs."""
    if weight.mode == "int4":
        return quantize_activation(x, weight.group_size)
    return quantize_activation(x, INT8_X_GROUP, 32767)
