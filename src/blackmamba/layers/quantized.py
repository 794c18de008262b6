"""``QuantizedLinear``: a bias-free linear layer whose weight is stored quantized (``ops.quant``: int8 with a
scale per output row, or int4 with a scale per group of inputs), for inference.

Its ``weight`` is a ``QuantizedWeight`` (not a tensor) built on the module's two buffers, ``weight_q`` and
``weight_scales`` (the names its checkpoint tensors take); ``forward`` is op ``linear`` on it, whose ``cpu``
backend reads the quantized bytes directly (the weights never dequantized in memory). The layers that take linear
operands (``ops.linear.operand``) hand the ``QuantizedWeight`` itself to their ops, as they hand a plain
``nn.Linear``'s weight tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.linear import linear
from ..ops.quant import MODES, QuantizedWeight, quantize_weight


class QuantizedLinear(nn.Module):
    QUANTIZED_OPERAND = True  # ops.linear.operand hands its QuantizedWeight to the ops

    def __init__(self, in_features: int, out_features: int, mode: str, group_size: int = 32, device=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.group_size = group_size if mode == "int4" else 0
        if mode == "int8":
            q, s = (out_features, in_features), ((out_features,), torch.float32)
            qdtype = torch.int8
        else:
            q, s = (out_features, (in_features + 1) // 2), ((out_features, -(-in_features // group_size)),
                                                             torch.float16)
            qdtype = torch.uint8
        self.register_buffer("weight_q", torch.zeros(q, dtype=qdtype, device=device))
        self.register_buffer("weight_scales", torch.zeros(s[0], dtype=s[1], device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, mode: str, group_size: int = 32) -> "QuantizedLinear":
        """The layer computing x Wᵀ with ``weight`` (o, i) quantized."""
        qw = quantize_weight(weight, mode, group_size)
        layer = cls(qw.in_features, qw.out_features, mode, group_size, device="meta")
        layer.weight_q, layer.weight_scales = qw.q, qw.scales
        return layer

    @property
    def weight(self) -> QuantizedWeight:
        """The ``QuantizedWeight`` on the current buffers, cached (building one costs ~2 us, a decode step asks a few
        a layer) and rebuilt when a buffer object was replaced (``.to``, ``to_empty``, ``load_state_dict(assign=True)``,
        assignment); an in-place load (``copy_``) keeps the same tensors, so the cached one still reads them."""
        q, s = self._buffers["weight_q"], self._buffers["weight_scales"]
        w = self.__dict__.get("_weight")
        if w is None or w.q is not q or w.scales is not s:
            w = QuantizedWeight(self.mode, q, s, self.in_features, self.group_size)
            self.__dict__["_weight"] = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., i) → (..., o)."""
        return linear(x, self.weight)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}{group}"

    def _apply(self, fn, recurse: bool = True):
        """``.to(device)`` moves the bytes and scales; a cast (``.to(dtype)``, ``.half()``) leaves their dtypes, the
        format's, as they are."""
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        return super()._apply(keep_dtype, recurse)


class QuantizedEmbedding(QuantizedLinear):
    """An embedding table (V, H) stored quantized: the weight of a ``QuantizedLinear`` of H inputs and V outputs
    (what a tied LM head reads); a lookup dequantizes only the rows it reads, in float32. Made as the linear layer
    is: ``QuantizedEmbedding.from_weight(table, mode)``, or ``QuantizedEmbedding(H, V, mode)`` empty."""

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) → rows (..., H) float32."""
        flat = ids.reshape(-1)
        rows = QuantizedWeight(self.mode, self.weight_q[flat], self.weight_scales[flat], self.in_features,
                               self.group_size)
        return rows.dequantize().reshape(*ids.shape, self.in_features)
