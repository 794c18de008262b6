"""Model configuration: the per-layer pattern, the sizes, presets and validation.

The layer pattern is the release's ``mamba_moe_layers``: one string per layer.

- ``"r"``: a Mamba-1 selective-SSM mixer.
- ``"1"``: a dense gated MLP (as in the release's parser).
- ``"<E>"`` with E >= 2 (any number of digits, e.g. ``"8"`` or ``"16"``): a top-1 routed MoE MLP with E experts.
- ``"a"``: causal multi-head self-attention with rotary positions (for transformer baselines).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

ACTIVATION_NAMES = ("silu", "gelu")  # the experts' activations, as torch.nn.functional names them
ROUTER_TRAIN_MODES = ("sinkhorn_blackmamba", "sinkhorn", "top1")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


def parse_layer(spec: str, index: int | None = None) -> tuple[str, int]:
    """Parse one pattern entry into (kind, experts): kind in {"mamba", "mlp", "moe", "attention"}."""
    where = f"layers[{index}]" if index is not None else "layer"
    if not isinstance(spec, str):
        raise ConfigError(f"{where} = {spec!r}: each layer must be a string: 'r', 'a', '1' or an expert count like '8'")
    s = spec.strip()
    if s == "r":
        return "mamba", 0
    if s == "a":
        return "attention", 0
    if s.isdigit():
        n = int(s)
        if n == 1:
            return "mlp", 0
        if n >= 2:
            return "moe", n
    raise ConfigError(
        f"{where} = {spec!r} is not a layer type: use 'r' (Mamba), 'a' (attention), '1' (dense MLP) "
        f"or an expert count >= 2 such as '8' (top-1 MoE)"
    )


@dataclass
class BlackMambaConfig:
    """Architecture of a BlackMamba-style model (every field is saved in ``config.json``)."""

    layers: list[str] = field(default_factory=lambda: ["r", "8"] * 2)
    hidden_size: int = 64
    vocab_size: int = 256  # tokens the tokenizer knows
    pad_vocab_size_multiple: int = 1  # embedding rows = vocab_size rounded up to this multiple
    state_size: int = 16
    conv_width: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(hidden_size / 16)
    ffn_hidden_size: int = 128
    mlp_activation: str = "silu"  # "silu" (as trained) or "gelu" (what the released inference code computes)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    max_seq_len: int = 2048
    router_train_mode: str = "sinkhorn_blackmamba"
    num_heads: int = 4  # attention layers only

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def d_inner(self) -> int:
        return self.expand * self.hidden_size

    @property
    def dt_rank_value(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.hidden_size / 16)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def layer_kinds(self) -> list[tuple[str, int]]:
        return [parse_layer(s, i) for i, s in enumerate(self.layers)]

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        if isinstance(self.layers, str):
            raise ConfigError("layers must be a list of strings such as ['r', '8'], not a single string")
        self.layers = [str(s).strip() if isinstance(s, (str, int)) and not isinstance(s, bool) else s for s in self.layers]
        if len(self.layers) == 0:
            raise ConfigError("layers is empty: give at least one layer, e.g. ['r', '8']")
        for i, s in enumerate(self.layers):
            parse_layer(s, i)
        positive = ["hidden_size", "vocab_size", "pad_vocab_size_multiple", "state_size", "conv_width", "expand",
                    "ffn_hidden_size", "max_seq_len", "num_heads"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} = {v!r}: must be a positive integer")
        if self.dt_rank is not None and (not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise ConfigError(f"dt_rank = {self.dt_rank!r}: must be a positive integer or null (auto: ceil(hidden_size/16))")
        if self.mlp_activation not in ACTIVATION_NAMES:
            raise ConfigError(f"mlp_activation = {self.mlp_activation!r}: allowed values are {', '.join(ACTIVATION_NAMES)}")
        if self.router_train_mode not in ROUTER_TRAIN_MODES:
            raise ConfigError(
                f"router_train_mode = {self.router_train_mode!r}: allowed values are {', '.join(ROUTER_TRAIN_MODES)}"
            )
        if not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ConfigError(f"norm_eps = {self.norm_eps!r}: must be a positive number")
        for name in ("tie_embeddings", "residual_in_fp32"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} = {getattr(self, name)!r}: must be true or false")
        if "a" in self.layers and self.hidden_size % self.num_heads:
            raise ConfigError(f"num_heads = {self.num_heads} must divide hidden_size = {self.hidden_size}")

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BlackMambaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)} (known keys: {', '.join(sorted(known))})")
        return cls(**d)

    def replace(self, **overrides) -> "BlackMambaConfig":
        d = self.to_dict()
        d.update(overrides)
        return self.from_dict(d)

    # ----------------------------------------------------------------- counts
    def param_counts(self) -> tuple[int, int]:
        """(total, active per token) parameter counts, computed from the sizes alone."""
        H, I, N, K, R, F = (self.hidden_size, self.d_inner, self.state_size, self.conv_width,
                            self.dt_rank_value, self.ffn_hidden_size)
        total = active = 0
        for kind, experts in self.layer_kinds():
            norm = H
            if kind == "mamba":
                n = 2 * I * H + I * K + I + (R + 2 * N) * I + R * I + I + I * N + I + H * I
                total += n + norm
                active += n + norm
            elif kind == "attention":
                n = 4 * H * H
                total += n + norm
                active += n + norm
            elif kind == "mlp":
                n = 3 * F * H
                total += n + norm
                active += n + norm
            else:  # moe
                router = experts * H + experts
                expert = 3 * F * H
                total += router + experts * expert + norm
                active += router + expert + norm
        emb = self.padded_vocab_size * H
        head = 0 if self.tie_embeddings else emb
        final_norm = 2 * H
        total += emb + head + final_norm
        active += emb + head + final_norm
        return total, active

    def flops_per_token(self, context: int = 0) -> int:
        """Forward FLOPs per token (2 per multiply-add of the active weights, plus the scan and, at ``context``
        tokens before it, attention)."""
        _, active = self.param_counts()
        emb = self.padded_vocab_size * self.hidden_size
        matmul = 2 * (active - emb) + 2 * emb  # the tied head is a matmul; the embedding lookup is not
        scan = sum(9 * self.d_inner * self.state_size for k, _ in self.layer_kinds() if k == "mamba")
        attn = sum(4 * self.hidden_size * context for k, _ in self.layer_kinds() if k == "attention")
        return matmul + scan + attn


def compact_pattern(layers: list[str]) -> str:
    """["r","8","r","8"] → '["r", "8"] × 2'; a pattern with no repeating unit is shown as is."""
    n = len(layers)
    for unit in range(1, n // 2 + 1):
        if n % unit == 0 and layers == layers[:unit] * (n // unit):
            return f"{layers[:unit]} × {n // unit}".replace("'", '"')
    return str(layers).replace("'", '"')


def describe(cfg: BlackMambaConfig) -> str:
    """What ``blackmamba info`` and ``blackmamba train`` print about an architecture."""
    total, active = cfg.param_counts()
    counts: dict[str, int] = {}
    for s in cfg.layers:
        counts[s] = counts.get(s, 0) + 1
    runs = ", ".join(f"{n}×{s!r}" for s, n in counts.items())
    state = sum(cfg.d_inner * ((cfg.conv_width - 1) * 4 + cfg.state_size * 4)
                for k, _ in cfg.layer_kinds() if k == "mamba")
    lines = [
        f"layers          {cfg.num_layers}: {runs}",
        f"pattern         {compact_pattern(cfg.layers)}",
        f"hidden / inner  {cfg.hidden_size} / {cfg.d_inner} (state {cfg.state_size}, conv {cfg.conv_width}, "
        f"dt rank {cfg.dt_rank_value})",
        f"ffn             {cfg.ffn_hidden_size} ({cfg.mlp_activation} gated)",
        f"vocab           {cfg.vocab_size} (embedding rows {cfg.padded_vocab_size})",
        f"parameters      {total:,} total, {active:,} active per token",
        f"FLOPs/token     {cfg.flops_per_token():,} (forward)",
        f"recurrent state {state / 1024:.1f} KiB per sequence (fp32), independent of context length",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- presets
PRESETS: dict[str, dict] = {
    # test-sized: a few thousand parameters, runs in milliseconds
    "tiny": dict(layers=["r", "4", "r", "4"], hidden_size=32, vocab_size=256, ffn_hidden_size=64, max_seq_len=256),
    # the default for `blackmamba train` on the embedded corpus (a few minutes on 2 CPU cores): 2.3M parameters,
    # 1.0M active per token; vocab_size is replaced by the tokenizer's (a 4096-id BPE by default)
    "small": dict(layers=["r", "8"] * 2, hidden_size=128, vocab_size=4096, pad_vocab_size_multiple=64,
                  ffn_hidden_size=256, max_seq_len=1024),
    "blackmamba-1.5b": dict(layers=["r", "8"] * 15, hidden_size=1152, vocab_size=50277, pad_vocab_size_multiple=128,
                            ffn_hidden_size=3072, max_seq_len=2048),
    "blackmamba-2.8b": dict(layers=["r", "8"] * 18, hidden_size=1472, vocab_size=50277, pad_vocab_size_multiple=128,
                            ffn_hidden_size=3872, max_seq_len=2048),
}


def preset(name: str, **overrides) -> BlackMambaConfig:
    """A named preset (``tiny``, ``small``, ``blackmamba-1.5b``, ``blackmamba-2.8b``) with optional overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    d = dict(PRESETS[name])
    d.update(overrides)
    return BlackMambaConfig.from_dict(d)
