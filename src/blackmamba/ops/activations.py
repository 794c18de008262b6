"""The experts' activations, by the config's name: ``silu`` (as trained) and ``gelu`` (exact erf, what the released
inference code computes). The kernels implement the same two (``ops/cpu/csrc/act.h``, the Triton MoE kernels)."""

import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}
