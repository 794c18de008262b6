"""nn.Modules: the Mamba mixer, MoE and dense MLPs, norms and (for baselines) attention."""

from .attention import Attention
from .mamba import MambaMixer
from .mlp import GatedMLP
from .moe import MoE
from .norm import RMSNorm

__all__ = ["Attention", "MambaMixer", "GatedMLP", "MoE", "RMSNorm"]
