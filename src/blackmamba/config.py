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
ROUTER_TRAIN_MODES = ("sinkhorn_blackmamba", "sinkhorn", "sinkhorn_marginal", "top1")


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
    def params_by_kind(self) -> dict[str, tuple[int, int]]:
        """(total, active per token) parameters summed over the layers of each kind present in the pattern (each
        block's RMSNorm counted with its layer), then "embedding" and "head" (the untied output layer, 0 when tied,
        and the final LayerNorm): the keys of ``flops_by_kind``. Computed from the sizes alone."""
        H, I, N, K, R, F = (self.hidden_size, self.d_inner, self.state_size, self.conv_width,  # noqa: E741
                            self.dt_rank_value, self.ffn_hidden_size)
        out: dict[str, tuple[int, int]] = {}
        for kind, experts in self.layer_kinds():
            norm = H
            if kind == "mamba":
                total = active = 2 * I * H + I * K + I + (R + 2 * N) * I + R * I + I + I * N + I + H * I + norm
            elif kind == "attention":
                total = active = 4 * H * H + norm
            elif kind == "mlp":
                total = active = 3 * F * H + norm
            else:  # moe: the router and every expert / one expert per token
                router, expert = experts * H + experts, 3 * F * H
                total, active = router + experts * expert + norm, router + expert + norm
            t, a = out.get(kind, (0, 0))
            out[kind] = (t + total, a + active)
        emb = self.padded_vocab_size * H
        head = (0 if self.tie_embeddings else emb) + 2 * H
        out["embedding"] = (emb, emb)
        out["head"] = (head, head)
        return out

    def param_counts(self) -> tuple[int, int]:
        """(total, active per token) parameter counts, computed from the sizes alone."""
        counts = self.params_by_kind().values()
        return sum(t for t, _ in counts), sum(a for _, a in counts)

    # ----------------------------------------------------------------- FLOPs
    # Conventions: 2 FLOPs per multiply-add; 1 per other elementwise operation, each pointwise function (exp,
    # softplus, sigmoid, silu, gelu, cos, sin) counted as one. Not counted: per-token scalars (a norm's mean and
    # rsqrt), comparisons (max, argmax, masks), indexing and copies, the routing's Sinkhorn balancing in training,
    # the loss. Each block's count holds its entry (RMSNorm: x², sum, × rsqrt, × weight: 4H) and the residual add
    # of its output (H: the next block's entry or the head adds it); the head holds the final LayerNorm (7H).
    def _block_flops(self, kind: str, experts: int, context: int) -> tuple[int, int]:
        """(matmul, other) forward FLOPs per token of one block of ``kind``, its queries scored against
        ``context`` keys (attention). matmul: the products FlopCounterMode counts (mm / addmm / bmm, attention's
        QKᵀ and AV, convolution), biases excluded; other: everything else (the conventions above)."""
        H, I, N, K, R, F = (self.hidden_size, self.d_inner, self.state_size, self.conv_width,  # noqa: E741
                            self.dt_rank_value, self.ffn_hidden_size)
        norm = 5 * H
        if kind == "mamba":
            matmul = (2 * H * 2 * I  # in_proj
                      + 2 * I * K  # depthwise conv
                      + 2 * I * (R + 2 * N)  # x_proj
                      + 2 * R * I  # dt_proj
                      + 2 * I * H)  # out_proj
            # selective scan, per (channel, state) element: Δ·A, exp, ·B (Δ·x is once per channel), dA·h, + dBx,
            # then y += C·h (a multiply-add): 7 FLOPs; plus Δ·x: 1 per channel
            scan = 7 * I * N + I
            other = (I + I  # conv bias, silu
                     + I + I  # dt bias, softplus
                     + scan
                     + 2 * I  # D skip: x·D, +
                     + 2 * I  # gate: silu(z), ×
                     + norm)
        elif kind in ("mlp", "moe"):
            matmul = 2 * H * 2 * F + 2 * F * H  # gated MLP (one expert per token): fc1, fc2
            other = 2 * F + norm  # act(a) * b
            if kind == "moe":
                matmul += 2 * H * experts  # router
                other += 2 * experts + H  # router bias, sigmoid; the output × its gate
        else:  # attention
            heads = self.num_heads
            matmul = 2 * H * 3 * H + 4 * H * context + 2 * H * H  # qkv, QKᵀ and AV over context keys, out_proj
            rotary = 3 * 2 * H + 3 * (H // heads // 2)  # q and k: 3 per element; angles: ×, cos, sin per frequency
            softmax = 5 * heads * context  # per score: scale, − max, exp, sum, ÷
            other = rotary + softmax + norm
        return matmul, other

    def flops_by_kind(self, context: int, matmul_only: bool = False) -> dict[str, int]:
        """Forward FLOPs per token, summed over the layers of each kind present in the pattern ("mamba", "moe",
        "mlp", "attention"), then "embedding" (0: a lookup) and "head" (final LayerNorm, 2·H·padded vocab);
        conventions above. ``context``: the keys each attention query is scored against. A training forward over
        windows of L tokens scores all L keys for every query (an explicit causal mask, not skipped blocks), so
        its count takes context = L: the convention of PaLM and Chinchilla. ``matmul_only``: only the products
        FlopCounterMode measures (projections, router, one expert, conv, QKᵀ / AV, head; no bias)."""
        _check_tokens("context", context, 0)
        out: dict[str, int] = {}
        for kind, experts in self.layer_kinds():
            matmul, other = self._block_flops(kind, experts, context)
            out[kind] = out.get(kind, 0) + matmul + (0 if matmul_only else other)
        out["embedding"] = 0
        out["head"] = 2 * self.hidden_size * self.padded_vocab_size + (0 if matmul_only else 7 * self.hidden_size)
        return out

    def flops_per_token(self, context: int = 0) -> int:
        """Forward FLOPs per token, attention scored against ``context`` keys: the sum of ``flops_by_kind``."""
        return sum(self.flops_by_kind(context).values())

    def train_flops_per_token(self, seq_len: int, activation_checkpointing: bool = False) -> int:
        """Training FLOPs per token on windows of ``seq_len`` tokens: forward + backward = 3 × the forward at
        context = seq_len (the backward computes two products per forward one: the inputs' and the weights' gradients);
        activation checkpointing recomputes every block's forward once more (not the embedding, not the head)."""
        _check_tokens("seq_len", seq_len, 1)
        fwd = self.flops_by_kind(seq_len)
        blocks = sum(v for k, v in fwd.items() if k not in ("embedding", "head"))
        return 3 * sum(fwd.values()) + (blocks if activation_checkpointing else 0)

    def decode_flops_per_token(self, context: int) -> int:
        """FLOPs of one ``step`` with ``context`` tokens already in the state: attention scores context + 1 keys
        (itself included); every other kind costs the same at any context (Mamba's state has a fixed size)."""
        _check_tokens("context", context, 0)
        return self.flops_per_token(context + 1)


def _check_tokens(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} = {value!r}: must be an integer >= {minimum} (tokens)")


def compact_pattern(layers: list[str]) -> str:
    """["r","8","r","8"] → '["r", "8"] × 2'; a pattern with no repeating unit is shown as is."""
    n = len(layers)
    for unit in range(1, n // 2 + 1):
        if n % unit == 0 and layers == layers[:unit] * (n // unit):
            return f"{layers[:unit]} × {n // unit}".replace("'", '"')
    return str(layers).replace("'", '"')


def describe(cfg: BlackMambaConfig, context: int | None = None) -> str:
    """What ``blackmamba info`` and ``blackmamba train`` print about an architecture; the FLOPs table counts a
    training window of ``context`` tokens and a decode step after ``context`` tokens (None: ``max_seq_len``)."""
    context = cfg.max_seq_len if context is None else context
    total, active = cfg.param_counts()
    counts: dict[str, int] = {}
    for s in cfg.layers:
        counts[s] = counts.get(s, 0) + 1
    runs = ", ".join(f"{n}×{s!r}" for s, n in counts.items())
    state = sum(cfg.d_inner * ((cfg.conv_width - 1) * 4 + cfg.state_size * 4)
                for k, _ in cfg.layer_kinds() if k == "mamba")
    kv = sum(2 * cfg.hidden_size * 4 for k, _ in cfg.layer_kinds() if k == "attention")  # a key and a value, fp32
    grows = f" + a KV cache of {kv / 1024:.1f} KiB per token of context" if kv else ", independent of context length"
    lines = [
        f"layers          {cfg.num_layers}: {runs}",
        f"pattern         {compact_pattern(cfg.layers)}",
        f"hidden / inner  {cfg.hidden_size} / {cfg.d_inner} (state {cfg.state_size}, conv {cfg.conv_width}, "
        f"dt rank {cfg.dt_rank_value})",
        f"ffn             {cfg.ffn_hidden_size} ({cfg.mlp_activation} gated)",
        f"vocab           {cfg.vocab_size} (embedding rows {cfg.padded_vocab_size})",
        f"parameters      {total:,} total, {active:,} active per token",
        f"recurrent state {state / 1024:.1f} KiB per sequence (fp32){grows}",
        *_flops_table(cfg, context),
    ]
    return "\n".join(lines)


def _flops_table(cfg: BlackMambaConfig, context: int) -> list[str]:
    """The FLOPs per token of each layer kind (``flops_by_kind``): forward and training (3 × forward) on windows
    of ``context`` tokens, one decode step after ``context`` tokens; its lines, for ``describe``."""
    _check_tokens("context", context, 1)
    fwd, dec = cfg.flops_by_kind(context), cfg.flops_by_kind(context + 1)
    params = cfg.params_by_kind()
    layers = {k: sum(1 for kind, _ in cfg.layer_kinds() if kind == k) for k in fwd}
    row = "  {:<10} {:>6} {:>15} {:>15} {:>15} {:>15}".format
    lines = [f"FLOPs/token     forward and train (3 × forward) on {context}-token windows, decode after {context} "
             f"tokens",
             row("", "layers", "active params", "forward", "train", "decode")]
    for k in fwd:
        lines.append(row(k, layers[k] or "-", f"{params[k][1]:,}", f"{fwd[k]:,}", f"{3 * fwd[k]:,}", f"{dec[k]:,}"))
    lines.append(row("total", cfg.num_layers, f"{sum(a for _, a in params.values()):,}", f"{sum(fwd.values()):,}",
                     f"{cfg.train_flops_per_token(context):,}", f"{cfg.decode_flops_per_token(context):,}"))
    lines.append(f"  with activation checkpointing (one more forward of every block): "
                 f"{cfg.train_flops_per_token(context, activation_checkpointing=True):,} train FLOPs/token")
    return lines


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
