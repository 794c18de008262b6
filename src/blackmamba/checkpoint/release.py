"""The released checkpoints' format: ``config.json`` (num_layers, hidden_size, ..., mamba_moe_layers) and
``pytorch_model.bin``, a pickle of ``{"model": state_dict}`` read with ``torch.load(weights_only=True)`` (no
pickled code runs). Its tensors have the native key layout; only the config differs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import BlackMambaConfig, ConfigError, parse_layer
from ..files import atomic_file, write_json
from ..model import BlackMambaLM
from .errors import CheckpointError

RELEASE_WEIGHTS = "pytorch_model.bin"
CONFIG_NAME = "config.json"
RELEASE_CONFIG_KEYS = ("num_layers", "hidden_size", "state_size", "conv_dimension", "vocab_size", "expansion_factor",
                       "mamba_moe_layers", "ffn_hidden_size", "bias", "add_bias_linear", "swiglu",
                       "max_sequence_length")
_RELEASE_REQUIRED = ("num_layers", "hidden_size", "state_size", "conv_dimension", "vocab_size", "expansion_factor",
                     "mamba_moe_layers", "ffn_hidden_size")
# bookkeeping keys that transformers writes into config.json; not part of the architecture


def config_from_release(d: dict) -> BlackMambaConfig:
    """The release's config.json → BlackMambaConfig (SiLU experts, as trained; override with mlp_activation)."""
    unknown = sorted(set(d) - set(RELEASE_CONFIG_KEYS))
    if unknown:
        raise CheckpointError(f"release config.json has unknown keys: {', '.join(unknown)} "
                              f"(known: {', '.join(RELEASE_CONFIG_KEYS)})")
    missing = [k for k in _RELEASE_REQUIRED if k not in d]
    if missing:
        raise CheckpointError(f"release config.json is missing keys: {', '.join(missing)}")
    layers = d["mamba_moe_layers"]
    if not isinstance(layers, list) or len(layers) != d["num_layers"]:
        raise CheckpointError(f"release config.json: mamba_moe_layers has {len(layers) if isinstance(layers, list) else '?'}"
                              f" entries but num_layers is {d['num_layers']}")
    for i, s in enumerate(layers):
        try:
            kind, _ = parse_layer(s, i)
        except ConfigError as e:
            raise CheckpointError(f"release config.json: mamba_moe_layers[{i}] = {s!r}: {e}") from None
        if kind == "attention":
            raise CheckpointError(f"release config.json: mamba_moe_layers[{i}] = {s!r}: the release has no attention")
    for k in ("bias", "add_bias_linear"):
        if d.get(k, False):
            raise CheckpointError(f"release config.json: {k} = true is not supported (released models have no linear biases)")
    if not d.get("swiglu", True):
        raise CheckpointError("release config.json: swiglu = false (ungated MLPs) is not supported")
    try:
        return BlackMambaConfig(layers=[str(s) for s in layers], hidden_size=d["hidden_size"],
                                vocab_size=d["vocab_size"], state_size=d["state_size"],
                                conv_width=d["conv_dimension"], expand=d["expansion_factor"],
                                ffn_hidden_size=d["ffn_hidden_size"],
                                max_seq_len=d.get("max_sequence_length", 2048))
    except ConfigError as e:
        raise CheckpointError(f"release config.json: {e}") from None


def config_to_release(cfg: BlackMambaConfig) -> dict:
    problems = []
    if any(k == "attention" for k, _ in cfg.layer_kinds()):
        problems.append("attention layers")
    if not cfg.tie_embeddings:
        problems.append("untied output layer")
    if cfg.dt_rank is not None and cfg.dt_rank != -(-cfg.hidden_size // 16):
        problems.append(f"dt_rank {cfg.dt_rank} != ceil(hidden_size/16)")
    if cfg.norm_eps != 1e-5:
        problems.append(f"norm_eps {cfg.norm_eps} != 1e-5")
    if problems:
        raise CheckpointError(f"this model cannot be written in the release format: {', '.join(problems)}")
    return {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "state_size": cfg.state_size,
            "conv_dimension": cfg.conv_width, "vocab_size": cfg.padded_vocab_size,
            "expansion_factor": cfg.expand, "mamba_moe_layers": list(cfg.layers),
            "ffn_hidden_size": cfg.ffn_hidden_size, "bias": False, "add_bias_linear": False, "swiglu": True,
            "max_sequence_length": cfg.max_seq_len}


def save_release(model: BlackMambaLM, directory, *, dtype: torch.dtype | None = None) -> None:
    """Release format: config.json + pytorch_model.bin ({"model": state_dict}), dtype kept unless given. A quantized
    model cannot be written in it (the release's code reads full-precision weights): CheckpointError."""
    if getattr(model, "quantization", None) is not None:
        raise CheckpointError(f"the release format holds full-precision weights only; this model is "
                              f"{model.quantization.mode} quantized: save it in the native format")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = config_to_release(model.config)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
          for k, v in model.state_dict().items()}
    with atomic_file(directory / RELEASE_WEIGHTS) as tmp:
        torch.save({"model": sd}, tmp)
    write_json(directory / CONFIG_NAME, cfg)
