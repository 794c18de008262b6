"""``BlackMambaConfig`` for transformers: the core config's fields as a ``PreTrainedConfig``.

The fields (names, defaults, meaning) are exactly those of ``blackmamba.config.BlackMambaConfig``, so a
native ``config.json`` is a valid transformers config and a transformers-saved one is a valid native one
(the bookkeeping keys transformers adds are ignored by ``blackmamba.load_pretrained``). Validation is the
core's: ``to_core()`` builds the core config and raises ``ConfigError`` naming the bad field.

``save_pretrained`` copies this file next to the weights for ``trust_remote_code``: import the core package
by absolute name, the other ``blackmamba.hf`` modules relatively.
"""

from __future__ import annotations

from dataclasses import field

from transformers import PreTrainedConfig

from blackmamba.config import BlackMambaConfig as CoreConfig


class BlackMambaConfig(PreTrainedConfig):
    """Architecture of a BlackMamba model; see ``blackmamba.config.BlackMambaConfig`` for each field."""

    model_type = "blackmamba"
    # as register_for_auto_class("AutoConfig") would: save_pretrained writes auto_map and copies this code
    _auto_class = "AutoConfig"

    layers: list[str] = field(default_factory=lambda: ["r", "8"] * 2)
    hidden_size: int = 64
    vocab_size: int = 256
    pad_vocab_size_multiple: int = 1
    state_size: int = 16
    conv_width: int = 4
    expand: int = 2
    dt_rank: int | None = None
    ffn_hidden_size: int = 128
    mlp_activation: str = "silu"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    max_seq_len: int = 2048
    router_train_mode: str = "sinkhorn_blackmamba"
    num_heads: int = 4

    def __post_init__(self, **kwargs):
        self.layers = self.to_core().layers  # validates every field; normalises the pattern
        super().__post_init__(**kwargs)

    # ------------------------------------------------------------------ core bridge
    def to_core(self) -> CoreConfig:
        return CoreConfig(**{name: getattr(self, name) for name in CoreConfig.__dataclass_fields__})

    @classmethod
    def from_core(cls, config: CoreConfig, **kwargs) -> "BlackMambaConfig":
        return cls(**config.to_dict(), **kwargs)

    # ------------------------------------------------------------------ what transformers asks of a config
    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)


__all__ = ["BlackMambaConfig"]
