"""The four architectures ``blackmamba compare`` trains, at matched active parameters per token, and the scales.

Every architecture is derived from one BlackMamba pattern (Mamba ``"r"`` alternating with top-1 MoE ``"<E>"``):

- ``blackmamba``:      the pattern itself.
- ``mamba``:           every MoE layer replaced by a dense gated MLP of the same width (``"1"``). Dense Mamba is
  taken as Mamba / MLP rather than Mamba-only so that the two differ in exactly one thing, the routing: the same
  active parameters and FLOPs per token, BlackMamba holding E× the MLP parameters.
- ``transformer``:     every Mamba layer replaced by attention (``"a"``), every MoE layer by a dense MLP.
- ``transformer-moe``: every Mamba layer replaced by attention, the MoE layers kept.

Attention holds fewer parameters than a Mamba mixer of the same width (4H² against about 6H² + the SSM's), so the
two transformer variants get a wider MLP (``ffn_hidden_size``, a multiple of 8) chosen to match BlackMamba's
active parameters per token outside the embedding: ``match`` keeps them within ``TOLERANCE``.

Every architecture trains with the same run configuration otherwise (data, tokens, schedule, seed): the scale's
settings (``SCALES``), then the user's ``--set`` overrides.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..config import BlackMambaConfig, ConfigError, parse_layer
from ..train.config import RunConfig, build_config, parse_assignment, set_value

NAMES = ("blackmamba", "mamba", "transformer", "transformer-moe")
TOLERANCE = 0.10  # largest relative gap of active non-embedding parameters to BlackMamba's

# Each scale: the model preset with overrides, the run settings, the latency contexts, and whether it runs here.
SCALES: dict[str, dict] = {
    # a quick look: about 3 minutes on 2 CPU cores for all four
    "tiny": dict(preset="small", model=dict(hidden_size=64, ffn_hidden_size=128),
                 set=dict(**{"data.seq_len": 128, "optim.batch_size": 8, "optim.warmup_steps": 20,
                             "train.steps": 200, "train.log_every": 5, "train.eval_every": 25,
                             "train.checkpoint_every": 50, "train.sample_tokens": 40}),
                 contexts=(128, 512, 2048, 8192)),
    # the default: the main job's model and schedule exactly (preset small, 500 steps of 8 windows of 256 tokens;
    # its BlackMamba run is the main job's), validated every 50 steps for the loss curve; about 15 minutes
    "small": dict(preset="small", model={}, set={"train.eval_every": 50},
                  contexts=(128, 512, 2048, 8192)),
    # the paper's 340M-active / 1.5B-total BlackMamba, written out for a GPU cluster (torchrun), not run here:
    # 2048-token windows, a global batch of 512 windows (1M tokens), 300B tokens as the paper trained
    "paper": dict(preset="blackmamba-1.5b", model={},
                  set=dict(**{"data.seq_len": 2048, "data.vocab_size": 50277, "optim.batch_size": 512,
                              "optim.lr": 3e-4, "optim.min_lr": 3e-5, "optim.warmup_steps": 2000,
                              "train.steps": 286102, "train.device": "cuda", "train.precision": "bf16",
                              "train.threads": 0, "train.activation_checkpointing": True, "train.log_every": 50,
                              "train.eval_every": 2000, "train.checkpoint_every": 1000,
                              "train.keep_checkpoints": 3}),
                  contexts=(128, 512, 2048, 8192, 32768)),
}


@dataclass
class Architecture:
    name: str
    run: RunConfig  # the whole run configuration this architecture trains with

    @property
    def model(self) -> BlackMambaConfig:
        return self.run.model_config(self.run.data.vocab_size)


def _non_embedding_active(cfg: BlackMambaConfig) -> int:
    """Active parameters per token outside the embedding and head (which are the same in every architecture)."""
    _, active = cfg.param_counts()
    emb = cfg.padded_vocab_size * cfg.hidden_size
    return active - emb - (0 if cfg.tie_embeddings else emb)


def _derive(pattern: list[str], mixer: str | None, mlp: str | None) -> list[str]:
    """``pattern`` with every Mamba layer replaced by ``mixer`` and every MoE layer by ``mlp`` (None: kept)."""
    out = []
    for i, s in enumerate(pattern):
        kind, _ = parse_layer(s, i)
        out.append(mixer if kind == "mamba" and mixer else mlp if kind == "moe" and mlp else s)
    return out


def match(base: BlackMambaConfig, layers: list[str]) -> BlackMambaConfig:
    """``base`` with ``layers`` and the ``ffn_hidden_size`` (a multiple of 8) whose active non-embedding parameters
    come closest to ``base``'s; ConfigError if the closest is more than ``TOLERANCE`` away."""
    target = _non_embedding_active(base)
    heads = max(2, base.hidden_size // 64) if "a" in layers else base.num_heads  # 64-wide heads where possible
    while base.hidden_size % heads:
        heads -= 1
    cfg = base.replace(layers=layers, num_heads=heads)
    lo, hi = 1, max(2, 4 * target // (3 * base.hidden_size))  # the MLPs alone could hold every parameter
    while lo < hi:  # active parameters grow with the width: the smallest width reaching the target
        mid = (lo + hi) // 2
        if _non_embedding_active(cfg.replace(ffn_hidden_size=8 * mid)) < target:
            lo = mid + 1
        else:
            hi = mid
    best = min((cfg.replace(ffn_hidden_size=8 * w) for w in (max(1, lo - 1), lo)),
               key=lambda c: abs(_non_embedding_active(c) - target))
    gap = abs(_non_embedding_active(best) - target) / target
    if gap > TOLERANCE:
        raise ConfigError(f"no MLP width matches {layers}'s active parameters to {base.layers}'s within "
                          f"{TOLERANCE:.0%} (closest: {gap:.1%} apart): make the model wider")
    return best


def base_config(scale: str, data: list[str] | None = None, assignments: list[str] = ()) -> RunConfig:
    """The run configuration every architecture shares: the scale's settings, ``--data`` and ``--set``."""
    if scale not in SCALES:
        raise ConfigError(f"--scale {scale!r}: choose one of {', '.join(SCALES)}")
    s = SCALES[scale]
    cfg = build_config(s["preset"])
    for k, v in s["model"].items():
        set_value(cfg, f"model.{k}", v, f"scale {scale}")
    for k, v in s["set"].items():
        set_value(cfg, k, v, f"scale {scale}")
    if data:
        set_value(cfg, "data.paths", [str(p) for p in data], "--data")
    for text in assignments:
        set_value(cfg, *parse_assignment(text))
    cfg.validate()
    return cfg


def architectures(base: RunConfig) -> list[Architecture]:
    """The four architectures derived from ``base``'s BlackMamba pattern, in ``NAMES`` order."""
    model = base.model_config(base.data.vocab_size)
    kinds = {kind for kind, _ in model.layer_kinds()}
    if kinds != {"mamba", "moe"}:
        raise ConfigError(f"model.layers = {model.layers}: compare derives its four architectures from a BlackMamba "
                          f"pattern, Mamba ('r') and MoE ('8') layers only, both present")
    patterns = {"blackmamba": model.layers, "mamba": _derive(model.layers, None, "1"),
                "transformer": _derive(model.layers, "a", "1"), "transformer-moe": _derive(model.layers, "a", None)}
    out = []
    for name in NAMES:
        layers = patterns[name]
        cfg = model.replace(layers=layers) if "a" not in layers else match(model, layers)
        run = copy.deepcopy(base)
        for key in ("layers", "ffn_hidden_size", "num_heads"):
            run.model[key] = getattr(cfg, key)
        run.validate()
        out.append(Architecture(name, run))
    return out
