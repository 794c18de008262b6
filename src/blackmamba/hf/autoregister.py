"""Register the transformers classes with the auto classes when transformers loads them.

Importing ``transformers``' auto classes and ``PreTrainedModel`` takes seconds, which ``import blackmamba``
should not cost (most commands never touch transformers). ``install()`` therefore registers at once what is
already imported and otherwise waits, through an import hook, until transformers' own code imports
``configuration_auto`` (then ``AutoConfig`` learns ``"blackmamba"``) or ``modeling_auto`` (then
``AutoModelForCausalLM`` learns ``BlackMambaForCausalLM``). Either way, after ``import blackmamba``:

    AutoModelForCausalLM.from_pretrained(folder)   # no trust_remote_code needed

The classes also carry ``_auto_class`` (what ``register_for_auto_class`` sets), so ``save_pretrained`` writes
``auto_map`` and copies the code: such a folder loads with ``trust_remote_code=True`` wherever blackmamba is
installed, even in a process that never imported blackmamba.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODEL_AUTO = "transformers.models.auto.modeling_auto"


def register_config() -> None:
    from transformers import AutoConfig

    from .configuration import BlackMambaConfig

    AutoConfig.register(BlackMambaConfig.model_type, BlackMambaConfig, exist_ok=True)


def register_model() -> None:
    from transformers import AutoModelForCausalLM

    from .configuration import BlackMambaConfig
    from .modeling import BlackMambaForCausalLM

    register_config()
    AutoModelForCausalLM.register(BlackMambaConfig, BlackMambaForCausalLM, exist_ok=True)


_ACTIONS = {CONFIG_AUTO: register_config, MODEL_AUTO: register_model}


def _run(action) -> None:
    try:
        action()
    except Exception as e:  # an incompatible transformers must not break the user's own import
        warnings.warn(f"blackmamba: could not register with transformers' auto classes: {type(e).__name__}: {e}",
                      RuntimeWarning, stacklevel=2)


class _ThenRegister(importlib.abc.Loader):
    """Runs the real loader, then the registration for that module."""

    def __init__(self, loader, action):
        self.loader = loader
        self.action = action

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _run(self.action)

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        return getattr(self.loader, name)


class _Hook(importlib.abc.MetaPathFinder):
    def __init__(self, pending: dict):
        self.pending = pending

    def find_spec(self, fullname, path, target=None):
        action = self.pending.pop(fullname, None)
        if action is None:
            return None
        if not self.pending:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenRegister(spec.loader, action)
                return spec
        return None


def install() -> None:
    """Register now for what transformers has already imported, later for the rest."""
    if MODEL_AUTO in sys.modules:
        _run(register_model)
        return
    pending = dict(_ACTIONS)
    if CONFIG_AUTO in sys.modules:
        _run(pending.pop(CONFIG_AUTO))
    if not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook(pending))
