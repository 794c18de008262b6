"""The native format: ``config.json`` ({"model_type": "blackmamba", ...BlackMambaConfig fields}) and
``model.safetensors`` (or shards ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``).
A transformers folder written by ``blackmamba.hf`` is a native folder too (its bookkeeping keys are ignored).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import BlackMambaConfig, ConfigError
from ..model import BlackMambaLM, is_ssm_parameter
from ..files import atomic_file, write_json
from .errors import CheckpointError

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MODEL_TYPE = "blackmamba"
HF_BOOKKEEPING_KEYS = ("architectures", "auto_map", "dtype", "torch_dtype", "transformers_version",
                       "_name_or_path", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
                       "use_cache", "output_attentions", "output_hidden_states", "return_dict")


def config_from_native(d: dict) -> BlackMambaConfig:
    d = {k: v for k, v in d.items() if k != "model_type" and k not in HF_BOOKKEEPING_KEYS}
    try:
        return BlackMambaConfig.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"config.json: {e}") from None


def save_pretrained(model: BlackMambaLM, directory, *, max_shard_bytes: int | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """Native format: config.json + model.safetensors (sharded above ``max_shard_bytes``), and for a quantized
    model quantization.json (``blackmamba.quantize``; its bytes and scales are never cast)."""
    from safetensors.torch import save_file

    from ..quantize import QUANTIZATION_NAME, is_quantized_tensor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / QUANTIZATION_NAME).unlink(missing_ok=True)  # until the new weights are whole (written last)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and not is_ssm_parameter(k)
              and not is_quantized_tensor(k) else v).detach().contiguous().cpu()
          for k, v in model.state_dict().items()}
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
    if getattr(model, "quantization", None) is not None:
        write_json(directory / QUANTIZATION_NAME, model.quantization.to_dict())
    write_json(directory / CONFIG_NAME, {"model_type": MODEL_TYPE, **model.config.to_dict()})
