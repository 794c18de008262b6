"""blackmamba: BlackMamba (Mamba-1 + top-1 MoE) in plain PyTorch.

    import blackmamba
    model = blackmamba.load_pretrained("Zyphra/BlackMamba-1.5B")      # or a local folder
    logits = model(input_ids).logits                                  # (b, l, V)
    state = model.new_state(batch_size=b); model(ids, state=state)    # chunked prefill / decode
    ids = model.generate(input_ids, max_new_tokens=32)
    model.save_pretrained("out/")
"""

from .checkpoint import CheckpointError, load_pretrained, save_release
from .config import PRESETS, BlackMambaConfig, ConfigError, preset
from .hf.autoregister import install as _register_with_transformers
from .model import BlackMambaLM, ModelOutput, State

__version__ = "0.1.0"

__all__ = [
    "BlackMambaConfig", "BlackMambaLM", "CheckpointError", "ConfigError", "ModelOutput", "PRESETS", "State",
    "load_pretrained", "preset", "save_release", "__version__",
]

_register_with_transformers()  # with AutoConfig / AutoModelForCausalLM, once transformers loads them
