"""Models the tests build: random weights everywhere (norms, biases, routers too), the shared small config, and a
release-format folder written by hand (independently of blackmamba.save_release)."""

import json

import torch

from blackmamba import BlackMambaConfig, BlackMambaLM


def random_model(cfg: BlackMambaConfig, seed: int = 0) -> BlackMambaLM:
    """A model whose every tensor is random (norm weights, biases and routers included), in eval mode."""
    torch.manual_seed(seed)
    model = BlackMambaLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("final_layernorm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(("final_layernorm.bias", "conv1d.bias", "router.bias")):
                p.copy_(0.2 * torch.randn_like(p))
            elif name.endswith("router.weight"):
                p.copy_(torch.randn_like(p))
            elif name.endswith(".D"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


SMALL = dict(layers=["r", "8", "r", "3", "r", "12"], hidden_size=32, vocab_size=97, ffn_hidden_size=48,
             max_seq_len=512)


def write_release_checkpoint(path, model: BlackMambaLM, dtype=torch.float32) -> dict:
    """Write ``model`` in the release's format by hand (independently of blackmamba.save_release)."""
    cfg = model.config
    rel = {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "state_size": cfg.state_size,
           "conv_dimension": cfg.conv_width, "vocab_size": cfg.padded_vocab_size,
           "expansion_factor": cfg.expand, "mamba_moe_layers": list(cfg.layers),
           "ffn_hidden_size": cfg.ffn_hidden_size, "bias": False, "add_bias_linear": False, "swiglu": True,
           "max_sequence_length": cfg.max_seq_len}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(rel))
    sd = {k: v.detach().to(dtype).clone() for k, v in model.state_dict().items()}
    torch.save({"model": sd}, path / "pytorch_model.bin")
    return rel
