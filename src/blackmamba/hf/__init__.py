"""Hugging Face transformers integration: ``BlackMambaConfig`` (a ``PreTrainedConfig``) and
``BlackMambaForCausalLM`` (a ``PreTrainedModel`` + ``GenerationMixin``) over the core model.

``import blackmamba`` registers both with ``AutoConfig`` / ``AutoModelForCausalLM`` as soon as transformers'
auto classes are imported (see ``autoregister``), so importing blackmamba never imports transformers itself.
This package's ``__init__`` imports transformers only when one of its classes is asked for.
"""

from __future__ import annotations

_EXPORTS = {
    "BlackMambaCache": "cache",
    "BlackMambaConfig": "configuration",
    "BlackMambaForCausalLM": "modeling",
    "BlackMambaCausalLMOutput": "modeling",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
