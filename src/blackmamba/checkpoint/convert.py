"""``blackmamba convert SRC DST --to {native,release,hf}``: between checkpoint formats, losslessly.

- ``native``:  config.json (model_type "blackmamba" + the config fields) + model.safetensors (sharded above
  ``--max-shard-size``: model-0000i-of-0000n.safetensors + model.safetensors.index.json);
- ``release``: the released format, config.json + pytorch_model.bin ({"model": state_dict});
- ``hf``:      a transformers folder: what ``BlackMambaForCausalLM.save_pretrained`` writes — the native
  files plus ``architectures`` / ``auto_map`` in config.json and the model code for ``trust_remote_code``.

All formats share one key layout, so a conversion moves the very same tensors: no model is run and every
tensor keeps its dtype and bits unless ``--dtype`` asks for another (then native / hf hold the SSM parameters
A_log and D in fp32, as ``load_pretrained`` does; the release format holds everything in that dtype). SRC is checked
against the architecture its config describes before anything is written. The output is assembled in a
temporary folder next to DST and renamed into place, so an interrupted conversion leaves no partial DST.
A ``tokenizer.json`` (and its companions) in SRC is copied along.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from ..files import OutputError, atomic_dir, check_free_space, describe_os_error, writable_folder, write_errors
from .load import read_model

FORMATS = ("native", "release", "hf")
DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes → bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size: use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    n = float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]
    if n < 1:
        raise ValueError(f"size {text!r} must be at least one byte")
    return int(n)


def cast(model, to: str, dtype: torch.dtype) -> None:
    """Cast the floating-point weights to ``dtype``; native / hf keep A_log and D in fp32."""
    if to == "release":
        model.to(dtype)
    else:
        model.to_dtype(dtype)


def write(model, directory: Path, to: str, *, max_shard_bytes: int) -> None:
    from .native import save_pretrained
    from .release import save_release

    if to == "native":
        save_pretrained(model, directory, max_shard_bytes=max_shard_bytes)
    elif to == "release":
        save_release(model, directory)
    else:
        try:
            from ..hf.modeling import BlackMambaForCausalLM
        except ImportError as e:
            raise ValueError(f"--to hf needs transformers: pip install 'blackmamba[hf]' ({e})") from None
        BlackMambaForCausalLM.from_core(model).save_pretrained(directory, max_shard_size=max_shard_bytes)


def convert(src, dst, to: str = "native", *, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 10**9,
            quantize: str | None = None, group_size: int = 32, quantize_embedding: bool = False) -> str:
    """Convert SRC (folder or hub id) into the new folder DST; returns SRC's format. ``quantize`` ("int8" |
    "int4", ``group_size`` for int4; ``quantize_embedding``: the embedding table too): write a quantized native
    checkpoint (``blackmamba.quantize``; ``dtype`` then casts the weights left unquantized)."""
    if to not in FORMATS:
        raise ValueError(f"--to {to!r}: choose one of {', '.join(FORMATS)}")
    if quantize is not None:
        from ..quantize import Quantization

        Quantization(quantize, group_size)  # ValueError naming a bad mode or group size
        if to != "native":
            raise ValueError(f"--quantize writes the native format (quantization.json + safetensors); the {to} "
                             f"format holds full-precision weights only")
    dst = Path(dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{dst} already exists and is not an empty folder: choose a new destination")
    writable_folder(dst.parent)  # before reading SRC, which may be a download of gigabytes
    model, fmt, directory = read_model(src)  # the stored tensors as they are
    if model.quantization is not None and (to != "native" or (
            quantize is not None and model.quantization.mismatch(quantize, group_size, quantize_embedding))):
        raise ValueError(f"{src} holds {model.quantization.mode} weights: it converts to the native format only, "
                         f"as it is (convert the full-precision checkpoint to get another format, mode, group "
                         f"size or embedding)")
    if quantize is not None and model.quantization is None:
        from ..quantize import quantize_model

        quantize_model(model, quantize, group_size, embedding=quantize_embedding)
    if dtype is not None:
        cast(model, to, dtype)
    check_free_space(dst.parent, sum(t.numel() * t.element_size() for t in model.state_dict().values()),
                     "the converted checkpoint")
    try:
        with atomic_dir(dst) as tmp:  # DST appears complete or not at all
            write(model, tmp, to, max_shard_bytes=max_shard_bytes)
            for name in TOKENIZER_FILES:
                if (directory / name).is_file():
                    shutil.copyfile(directory / name, tmp / name)
    except write_errors() as e:
        raise OutputError(f"{dst}: could not write the checkpoint ({describe_os_error(e)}); nothing was left "
                          f"there") from None
    return fmt
