"""Checkpoints: the native format (safetensors + config.json), the release format, and hub ids.

Native folder:   ``config.json`` ({"model_type": "blackmamba", ...BlackMambaConfig fields})
                 + ``model.safetensors`` (or sharded ``model-0000x-of-0000n.safetensors`` + index)
Release folder:  ``config.json`` (num_layers, hidden_size, ..., mamba_moe_layers) + ``pytorch_model.bin``
                 holding ``{"model": state_dict}``; read with ``torch.load(weights_only=True)``.

Both share one key layout (the model's module names equal the release's), so loading is: read the
config, read the tensors, check every key and shape against the model, then assign. Any mismatch is a
``CheckpointError`` listing every offending key — never a silent partial load. Every file is written to
a temporary name and renamed (``blackmamba.files``), so an interrupted save never leaves a torn checkpoint.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from .config import BlackMambaConfig, ConfigError, parse_layer
from .files import atomic_file, write_json
from .model import BlackMambaLM

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
RELEASE_WEIGHTS = "pytorch_model.bin"
MODEL_TYPE = "blackmamba"
# keys of the release's config.json (DESIGN.md §1)
RELEASE_CONFIG_KEYS = ("num_layers", "hidden_size", "state_size", "conv_dimension", "vocab_size", "expansion_factor",
                       "mamba_moe_layers", "ffn_hidden_size", "bias", "add_bias_linear", "swiglu",
                       "max_sequence_length")
_RELEASE_REQUIRED = ("num_layers", "hidden_size", "state_size", "conv_dimension", "vocab_size", "expansion_factor",
                     "mamba_moe_layers", "ffn_hidden_size")
# bookkeeping keys that transformers writes into config.json; not part of the architecture
HF_BOOKKEEPING_KEYS = ("architectures", "auto_map", "dtype", "torch_dtype", "transformers_version",
                       "_name_or_path", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
                       "use_cache", "output_attentions", "output_hidden_states", "return_dict")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message lists every problem."""


# ----------------------------------------------------------------------------- configs
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


def config_from_native(d: dict) -> BlackMambaConfig:
    d = {k: v for k, v in d.items() if k != "model_type" and k not in HF_BOOKKEEPING_KEYS}
    try:
        return BlackMambaConfig.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"config.json: {e}") from None


def read_config(directory: Path) -> tuple[BlackMambaConfig, str]:
    """(config, format) where format is "release" or "native"."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME} (not a BlackMamba checkpoint folder)")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if "mamba_moe_layers" in d:
        return config_from_release(d), "release"
    if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise CheckpointError(f"{path}: model_type {d.get('model_type')!r} is not {MODEL_TYPE!r}")
    return config_from_native(d), "native"


# ----------------------------------------------------------------------------- tensors
def _owned(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the tensors in memory of their own. safetensors (0.8) hands out views into the mapped file at
    whatever offset each tensor sits, so a weight can start off a cache line, and MKL's kernels then take another
    path whose results differ in the last bit from the same weights in aligned memory; a mapped view would also
    follow the file if it were replaced while the model lives."""
    return {k: v.clone() for k, v in sd.items()}


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Read every weight file in ``directory`` (safetensors preferred, else the release's .bin) into memory.
    A file that cannot be read is a ``CheckpointError`` naming that file and why."""
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
        sd = {}
        for shard in shards:
            sd.update(_read_weights(directory / shard))
        return sd
    for name in (SAFETENSORS_NAME, RELEASE_WEIGHTS):
        if (directory / name).is_file():
            return _read_weights(directory / name)
    raise CheckpointError(f"{directory}: no weights ({SAFETENSORS_NAME}, {SAFETENSORS_INDEX} or {RELEASE_WEIGHTS})")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file, or a release ``.bin`` (a pickle of ``{"model": state_dict}``, read with
    ``weights_only=True``: anything but tensors and plain containers is refused, so no pickled code runs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return _owned(load_file(str(path)))
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        why = re.search(r"WeightsUnpickler error: ([^\n]*)", str(e))
        raise CheckpointError(f"{path}: unreadable weights (not a plain tensor pickle, refused: "
                              f"{why.group(1).strip()[:160] if why else type(e).__name__})") from None
    except (OSError, SafetensorError, RuntimeError, KeyError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable weights (truncated or not a weights file? "
                              f"{type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path}: expected {{'model': state_dict}} of tensors")
    return _owned(obj)


def check_state_dict(model: BlackMambaLM, sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise one CheckpointError naming every missing, unexpected and misshaped tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source} does not fit the model:"]
    for k in missing:
        lines.append(f"  missing tensor {k} (expected shape {list(expected[k])})")
    for k in unexpected:
        lines.append(f"  unexpected tensor {k} (shape {list(sd[k].shape)})")
    for k in misshaped:
        lines.append(f"  wrong shape for {k}: expected {list(expected[k])}, found {list(sd[k].shape)}")
    raise CheckpointError("\n".join(lines))


# ----------------------------------------------------------------------------- load
def resolve_path(path_or_id, revision: str | None = None) -> Path:
    """A local folder as is; a hub id ("Zyphra/BlackMamba-1.5B") downloaded through huggingface_hub.

    A name that can only be a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, or ``runs/x`` where ``runs`` is a local
    folder) is never looked up on the hub: its absence is reported as a missing folder. For ``owner/name`` that
    is neither here nor on the hub, the error says both."""
    spec = str(path_or_id)
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p}: not a folder (give the folder holding config.json)")
        return p
    first = Path(spec).parts[0] if Path(spec).parts else ""
    local = spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec) or Path(first).is_dir()
    if local:
        raise CheckpointError(f"{spec}: no such folder ({p.absolute()} does not exist)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", RELEASE_WEIGHTS, "*.txt"]))
    except Exception as e:  # network, auth, missing repo: one clear line
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{spec}: no such local folder ({p.absolute()} does not exist), and it could not be "
                              f"fetched from the Hugging Face hub as a model id ({type(e).__name__}: {why})") from None


def cast_model(model: BlackMambaLM, dtype: torch.dtype) -> BlackMambaLM:
    """Cast weights to ``dtype`` but keep the SSM parameters A_log and D in fp32."""
    model.to(dtype)
    for name, p in model.named_parameters():
        if name.endswith(("A_log", ".D")):
            p.data = p.data.float()
    return model


def load_pretrained(path_or_id, *, dtype: torch.dtype | str = torch.float32, device="cpu",
                    revision: str | None = None, **overrides) -> BlackMambaLM:
    """Load a native folder, a release folder or a hub id; ``overrides`` replace config fields
    (e.g. ``mlp_activation="gelu"``). ``dtype="auto"`` keeps the stored dtype (fp32 SSM parameters)."""
    directory = resolve_path(path_or_id, revision)
    config, fmt = read_config(directory)
    if overrides:
        try:
            config = config.replace(**overrides)
        except ConfigError as e:
            raise CheckpointError(f"override: {e}") from None
    sd = read_state_dict(directory)
    with torch.device("meta"):
        model = BlackMambaLM(config)
    check_state_dict(model, sd, f"{directory} ({fmt} format)")
    model.load_state_dict(sd, strict=True, assign=True)
    if dtype == "auto":
        dtype = next(iter(sd.values())).dtype
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    cast_model(model, dtype)
    model.to(device)
    for t in model.state_dict().values():  # nothing may stay on meta
        assert t.device.type != "meta"
    model.eval()
    model.source_format = fmt
    return model


# ----------------------------------------------------------------------------- save
def save_pretrained(model: BlackMambaLM, directory, *, max_shard_bytes: int | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """Native format: config.json + model.safetensors (sharded above ``max_shard_bytes``)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and not k.endswith(("A_log", ".D")) else v)
          .detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "model_type": MODEL_TYPE}
    if max_shard_bytes is None or sum(t.numel() * t.element_size() for t in sd.values()) <= max_shard_bytes:
        with atomic_file(directory / SAFETENSORS_NAME) as tmp:
            save_file(sd, str(tmp), metadata=meta)
        (directory / SAFETENSORS_INDEX).unlink(missing_ok=True)
    else:
        shards, cur, size = [], {}, 0
        for k, v in sd.items():
            nbytes = v.numel() * v.element_size()
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = v
            size += nbytes
        shards.append(cur)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with atomic_file(directory / name) as tmp:
                save_file(shard, str(tmp), metadata=meta)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        write_json(directory / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        (directory / SAFETENSORS_NAME).unlink(missing_ok=True)
    write_json(directory / CONFIG_NAME, {"model_type": MODEL_TYPE, **model.config.to_dict()})


def save_release(model: BlackMambaLM, directory, *, dtype: torch.dtype | None = None) -> None:
    """Release format: config.json + pytorch_model.bin ({"model": state_dict}), dtype kept unless given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = config_to_release(model.config)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
          for k, v in model.state_dict().items()}
    with atomic_file(directory / RELEASE_WEIGHTS) as tmp:
        torch.save({"model": sd}, tmp)
    write_json(directory / CONFIG_NAME, cfg)
