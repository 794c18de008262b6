"""Checkpoints: the native format (``native``: safetensors + config.json), the release's (``release``), hub ids
(``hub``), loading with strict checks (``load``) and lossless conversion between the formats (``convert``)."""

from .errors import CheckpointError
from .hub import resolve_path
from .load import check_state_dict, load_pretrained, read_config, read_model, read_state_dict
from .native import CONFIG_NAME, save_pretrained
from .release import save_release

__all__ = ["CONFIG_NAME", "CheckpointError", "check_state_dict", "load_pretrained", "read_config", "read_model",
           "read_state_dict", "resolve_path", "save_pretrained", "save_release"]
