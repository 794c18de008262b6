"""``blackmamba info MODEL``: parameters (total / active), layer pattern, FLOPs per token, state size."""

from __future__ import annotations

import argparse

from .config import BlackMambaConfig, preset


def flops_per_token(cfg: BlackMambaConfig, context: int = 0) -> int:
    """Forward FLOPs per token (2 per multiply-add of the active weights, plus the scan and attention)."""
    _, active = cfg.param_counts()
    emb = cfg.padded_vocab_size * cfg.hidden_size
    matmul = 2 * (active - emb) + 2 * emb  # the tied head is a matmul; the embedding lookup is not
    scan = sum(9 * cfg.d_inner * cfg.state_size for k, _ in cfg.layer_kinds() if k == "mamba")
    attn = sum(4 * cfg.hidden_size * context for k, _ in cfg.layer_kinds() if k == "attention")
    return matmul + scan + attn


def compact_pattern(layers: list[str]) -> str:
    """["r","8","r","8"] → '["r", "8"] × 2'; a pattern with no repeating unit is shown as is."""
    n = len(layers)
    for unit in range(1, n // 2 + 1):
        if n % unit == 0 and layers == layers[:unit] * (n // unit):
            return f"{layers[:unit]} × {n // unit}".replace("'", '"')
    return str(layers).replace("'", '"')


def describe(cfg: BlackMambaConfig) -> str:
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
        f"FLOPs/token     {flops_per_token(cfg):,} (forward)",
        f"recurrent state {state / 1024:.1f} KiB per sequence (fp32), independent of context length",
    ]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder, hub id (owner/name) or preset name (tiny, small, blackmamba-1.5b, ...)")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import read_config, resolve_path
    from .config import PRESETS

    if args.model in PRESETS:
        cfg = preset(args.model)
        source = f"preset {args.model}"
    else:
        cfg, fmt = read_config(resolve_path(args.model))
        source = f"{args.model} ({fmt} format)"
    print(f"{source}\n{describe(cfg)}")
    return 0
