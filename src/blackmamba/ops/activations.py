"""The experts' activations by the config's names: ``silu`` (as trained) and ``gelu`` (exact erf, what the released
inference code computes). The kernels implement the same two (``ops/cpu/csrc/act.h``, the Triton MoE kernels)."""

import torch.nn.functional as F

from ..config import ACTIVATION_NAMES

ACTIVATIONS = {name: getattr(F, name) for name in ACTIVATION_NAMES}
