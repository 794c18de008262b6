"""blackmamba: BlackMamba (Mamba-1 + top-1 MoE) in plain PyTorch.

    import blackmamba
    model = blackmamba.load_pretrained("Zyphra/BlackMamba-1.5B")      # or a local folder
    logits = model(input_ids).logits                                  # (b, l, V)
    state = model.new_state(batch_size=b); model(ids, state=state)    # chunked prefill / decode
    ids = model.generate(input_ids, max_new_tokens=32)
    model.save_pretrained("out/")
"""

import importlib

# name → submodule. Resolved on first use (PEP 562), so that ``import blackmamba.cli`` does not import torch
# before the command has set its allocator options (see cli.py).
_EXPORTS = {
    "CheckpointError": "checkpoint", "load_pretrained": "checkpoint", "save_release": "checkpoint",
    "PRESETS": "config", "BlackMambaConfig": "config", "ConfigError": "config", "preset": "config",
    "BlackMambaLM": "model", "ModelOutput": "model", "State": "state",
}

__version__ = "0.1.0"

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


from .hf.autoregister import install as _register_with_transformers  # noqa: E402  (imports neither torch nor transformers)

_register_with_transformers()  # with AutoConfig / AutoModelForCausalLM, once transformers loads them
