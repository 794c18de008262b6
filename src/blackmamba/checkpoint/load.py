"""Loading a checkpoint: a native folder (``native``), a release folder (``release``) or a hub id (``hub``).

Both formats share one key layout (the model's module names equal the release's), so loading is: read the
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

from ..config import BlackMambaConfig, ConfigError
from ..model import BlackMambaLM
from .errors import CheckpointError
from .hub import resolve_path
from .native import CONFIG_NAME, MODEL_TYPE, SAFETENSORS_INDEX, SAFETENSORS_NAME, config_from_native
from .release import RELEASE_WEIGHTS, config_from_release


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
    """Raise one CheckpointError naming every missing, unexpected and misshaped tensor, and every quantized
    layer's tensor whose dtype is not its format's (those are loaded as stored, never cast)."""
    from ..quantize import is_quantized_tensor

    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    mistyped = sorted(k for k in set(expected) & set(sd) if is_quantized_tensor(k) and sd[k].dtype != state[k].dtype)
    if not (missing or unexpected or misshaped or mistyped):
        return
    lines = [f"{source} does not fit the model:"]
    for k in missing:
        lines.append(f"  missing tensor {k} (expected shape {list(expected[k])})")
    for k in unexpected:
        lines.append(f"  unexpected tensor {k} (shape {list(sd[k].shape)})")
    for k in misshaped:
        lines.append(f"  wrong shape for {k}: expected {list(expected[k])}, found {list(sd[k].shape)}")
    for k in mistyped:
        lines.append(f"  wrong dtype for {k}: expected {state[k].dtype}, found {sd[k].dtype}")
    raise CheckpointError("\n".join(lines))


def read_model(path_or_id, revision: str | None = None, **overrides) -> tuple[BlackMambaLM, str, Path]:
    """(model holding the checkpoint's tensors exactly as stored — dtypes and bits —, its format, its folder).
    ``overrides`` replace config fields (e.g. ``mlp_activation="gelu"``). Nothing is computed on the weights."""
    directory = resolve_path(path_or_id, revision)
    config, fmt = read_config(directory)
    if overrides:
        try:
            config = config.replace(**overrides)
        except ConfigError as e:
            raise CheckpointError(f"override: {e}") from None
    quantization = read_quantization(directory)
    sd = read_state_dict(directory)
    with torch.device("meta"):
        model = BlackMambaLM(config)
    if quantization is not None:
        from ..quantize import quantized_structure

        quantized_structure(model, quantization)
        fmt = f"{fmt}, {quantization.mode} quantized"
    check_state_dict(model, sd, f"{directory} ({fmt} format)")
    model.load_state_dict(sd, strict=True, assign=True)  # assign: the stored tensors themselves
    model.source_format = fmt
    return model.eval(), fmt, directory


def read_quantization(directory: Path):
    """The folder's ``quantize.Quantization`` (from quantization.json), or None for a full-precision checkpoint."""
    from ..quantize import QUANTIZATION_NAME, Quantization

    path = Path(directory) / QUANTIZATION_NAME
    if not path.is_file():
        return None
    try:
        return Quantization.from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a quantization description ({e})") from None


def load_pretrained(path_or_id, *, dtype: torch.dtype | str = torch.float32, device="cpu",
                    revision: str | None = None, quantize: str | None = None, group_size: int = 32,
                    **overrides) -> BlackMambaLM:
    """Load a native folder, a release folder or a hub id, in eval mode; ``overrides`` replace config fields
    (e.g. ``mlp_activation="gelu"``). ``dtype="auto"`` keeps the stored dtype; A_log and D are always fp32.

    ``quantize="int8" | "int4"`` (``group_size`` 32 or 64 for int4): quantize the linear layers after loading
    (``blackmamba.quantize``); a quantized checkpoint (``convert --quantize``) loads as stored, and asking for
    another mode or group size than its own is a CheckpointError. ``dtype`` then applies to the weights left
    unquantized."""
    from ..quantize import Quantization, quantize_model

    if quantize is not None:
        try:
            Quantization(quantize, group_size)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    model, _, directory = read_model(path_or_id, revision, **overrides)
    stored = model.quantization
    differs = stored.mismatch(quantize, group_size) if stored is not None and quantize is not None else None
    if differs:
        raise CheckpointError(f"{directory} holds {differs}: it loads as stored (drop the quantize option, or "
                              f"convert the full-precision checkpoint)")
    if dtype == "auto":
        dtype = model.dtype
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if quantize is not None and model.quantization is None:
        try:
            quantize_model(model, quantize, group_size)  # from the weights as stored, before any cast
        except ValueError as e:
            raise CheckpointError(f"{directory}: cannot quantize: {e}") from None
    return model.to_dtype(dtype).to(device)
