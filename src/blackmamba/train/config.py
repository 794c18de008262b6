"""The run configuration: a dataclass tree (model preset + overrides, data, optim, train, parallel), read from
defaults, then ``--config file.toml``, then ``--preset``, then ``--set section.field=value`` overrides. The resolved
tree is saved as ``train_config.json`` in the run directory and next to every checkpoint.

TOML layout (every key optional)::

    preset = "small"            # model preset (blackmamba.config.PRESETS)
    [model]                     # overrides of BlackMambaConfig fields, e.g. hidden_size = 256
    [data]                      # paths, text_field, val_fraction, vocab_size, tokenizer, seq_len
    [[data.mixture]]            # paths = [...], weight = 3.0, name = "web": weighted components instead of paths
    [optim]                     # lr, min_lr, beta1, beta2, eps, weight_decay, warmup_steps, grad_clip, ...
    [train]                     # steps, seed, device, precision, log/eval/checkpoint intervals, ...
    [parallel]                  # ep, sinkhorn_scope, timeout_s (processes come from torchrun: docs/distributed.md)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..config import PRESETS, BlackMambaConfig, ConfigError, preset
from .precision import PRECISIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # files, folders, globs, hf:NAME (data/sources.py); empty:
    # the embedded Shakespeare corpus
    text_field: str = "text"  # the JSONL field / Parquet or dataset column holding a record's text
    # instead of paths, a weighted mixture: [[data.mixture]] tables of paths = [...], weight = w, name = "..."
    mixture: list[dict] = field(default_factory=list)
    val_fraction: float = 0.05  # the tail of every document held out for validation
    vocab_size: int = 4096  # size of the byte-level BPE trained on the training split
    tokenizer: str | None = None  # a tokenizer.json (or hub id) to use instead of training a BPE
    seq_len: int = 256  # tokens per training window


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr: float = 3e-4  # end of the cosine decay
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to A_log, D, norms, biases
    warmup_steps: int = 30  # linear warmup, then cosine to min_lr at train.steps
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass
class TrainConfig:
    steps: int = 500  # optimizer steps
    seed: int = 0  # model initialisation and data order
    device: str = "auto"  # auto (cuda when available), cpu, cuda
    precision: str = "auto"  # auto (bf16 autocast on cuda, fp32 on cpu), fp32, bf16
    threads: int = 1  # CPU threads for PyTorch ops; 0: one per core (docs/training.md: busy machines)
    activation_checkpointing: bool = False  # recompute each mixer in the backward: less memory, ~1 more forward
    log_every: int = 10  # steps between train records in metrics.jsonl
    eval_every: int = 250  # steps between validation passes (and at the end)
    checkpoint_every: int = 250  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept in RUN_DIR/checkpoints
    sample_prompts: list[str] = field(default_factory=lambda: ["ROMEO.\n", "KING HENRY.\n", "To be, or not"])
    sample_tokens: int = 80  # new tokens per sample printed at the end
    tensorboard: bool = False  # also write TensorBoard events to RUN_DIR/tensorboard


@dataclass
class ParallelConfig:
    ep: int = 1  # expert parallelism: ranks sharing each MoE layer's experts (divides the processes and experts)
    sinkhorn_scope: str = "global"  # global: balance every rank's tokens together (= one process); local: Megatron's
    timeout_s: float = 600.0  # a collective waiting longer than this fails the run (a rank died or hangs)


SECTIONS = ("model", "data", "optim", "train", "parallel")


@dataclass
class RunConfig:
    preset: str = "small"
    model: dict = field(default_factory=dict)  # overrides of the preset's BlackMambaConfig fields
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    # ------------------------------------------------------------------ model
    def model_config(self, vocab_size: int | None = None) -> BlackMambaConfig:
        """The preset with the overrides applied; ``vocab_size`` (the tokenizer's) replaces the preset's."""
        overrides = dict(self.model)
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        return preset(self.preset, **overrides)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        from ..files import write_json

        write_json(Path(path), self.to_dict())

    def to_toml(self) -> str:
        """The whole configuration as a ``--config`` file (``build_config`` reads it back to an equal one); unset
        optional values (None) are left out, as TOML has no null."""
        d = self.to_dict()
        lines = [f"preset = {_toml_value(d.pop('preset'))}"]
        for section in SECTIONS:
            values = d[section]
            tables = {k: v for k, v in values.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()
                                               if v is not None and k not in tables]
            for k, entries in tables.items():
                for entry in entries:
                    lines += ["", f"[[{section}.{k}]]"] + [f"{n} = {_toml_value(v)}" for n, v in entry.items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: unreadable run configuration ({e})") from None
        cfg = cls()
        apply_dict(cfg, d, str(path))
        return cfg

    def validate_world(self, world_size: int) -> None:
        """The checks that depend on the number of processes (``validate`` is for those that do not)."""
        b, ep = self.optim.batch_size, self.parallel.ep
        if b % world_size:
            raise ConfigError(f"optim.batch_size = {b} is the global batch, shared by {world_size} processes: make it "
                              f"a multiple of {world_size}")
        if world_size == 1 and ep > 1:
            raise ConfigError(f"parallel.ep = {ep} splits the experts over {ep} processes: launch with torchrun "
                              f"--nproc-per-node {ep} (or a multiple of {ep}), or --set parallel.ep=1")
        if world_size % ep:
            raise ConfigError(f"parallel.ep = {ep} does not divide the {world_size} processes: choose a divisor of "
                              f"{world_size} with --set parallel.ep=... (with --resume too: it is this launch's "
                              f"layout)")
        experts = sorted({e for kind, e in self.model_config().layer_kinds() if kind == "moe"})
        bad = [e for e in experts if e % ep]
        if bad:
            raise ConfigError(f"parallel.ep = {ep} does not divide the MoE layers' {bad[0]} experts: choose a divisor "
                              f"of {bad[0]}")

    def _validate_mixture(self) -> None:
        d = self.data
        if d.mixture and d.paths:
            raise ConfigError("data.paths (--data) and [[data.mixture]]: give one (a mixture lists its own paths)")
        names = set()
        for j, entry in enumerate(d.mixture):
            where = f"data.mixture[{j}]"
            unknown = set(entry) - {"paths", "weight", "name"}
            if unknown:
                raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: paths, weight, name)")
            paths, weight = entry.get("paths"), entry.get("weight")
            if isinstance(paths, str):
                paths = entry["paths"] = [paths]
            if not isinstance(paths, list) or not paths or not all(isinstance(x, str) for x in paths):
                raise ConfigError(f"{where}.paths: expected a list of files, folders, globs or hf: datasets")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                    math.isfinite(weight) and weight > 0):
                raise ConfigError(f"{where}.weight = {weight!r}: expected a positive number")
            name = entry.get("name", f"mixture[{j}]")
            if not isinstance(name, str) or name in names:
                raise ConfigError(f"{where}.name = {name!r}: expected a string naming no other component")
            names.add(name)

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"preset = {self.preset!r}: choose one of {', '.join(PRESETS)}")
        self.model_config()  # raises ConfigError for bad model overrides
        d, o, t, par = self.data, self.optim, self.train, self.parallel
        checks = [
            (0 < d.val_fraction < 1, "data.val_fraction", "must be between 0 and 1"),
            (d.vocab_size >= 257, "data.vocab_size", "must be at least 257 (256 bytes + EOS)"),
            (d.seq_len >= 2, "data.seq_len", "must be at least 2"),
            (o.lr > 0, "optim.lr", "must be positive"),
            (0 <= o.min_lr <= o.lr, "optim.min_lr", "must be between 0 and optim.lr"),
            (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)"),
            (o.eps > 0, "optim.eps", "must be positive"),
            (o.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
            (o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
            (o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0: no clipping)"),
            (o.batch_size >= 1, "optim.batch_size", "must be at least 1"),
            (o.grad_accum >= 1, "optim.grad_accum", "must be at least 1"),
            (t.steps >= 1, "train.steps", "must be at least 1"),
            (t.device in DEVICES, "train.device", f"must be one of {', '.join(DEVICES)}"),
            (t.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}"),
            (t.threads >= 0, "train.threads", "must be >= 0 (0: one per core)"),
            (t.log_every >= 1, "train.log_every", "must be at least 1"),
            (t.eval_every >= 1, "train.eval_every", "must be at least 1"),
            (t.checkpoint_every >= 1, "train.checkpoint_every", "must be at least 1"),
            (t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1"),
            (t.sample_tokens >= 0, "train.sample_tokens", "must be >= 0"),
            (par.ep >= 1, "parallel.ep", "must be at least 1"),
            (par.sinkhorn_scope in ("global", "local"), "parallel.sinkhorn_scope", "must be global or local"),
            (par.timeout_s > 0, "parallel.timeout_s", "must be positive"),
        ]
        for section in (d, o, t, par):
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{type(section).__name__[:-6].lower()}.{f.name} = {value}: must be a finite "
                                      f"number")
        for ok, name, why in checks:
            if not ok:
                raise ConfigError(f"{name}: {why}")
        self._validate_mixture()
        if t.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("train.tensorboard = true needs the tensorboard package: pip install tensorboard")


def _toml_value(v) -> str:
    """A TOML literal for a setting's value: a bool, number, string or list of them (JSON's string escapes are
    TOML's)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"{v!r}: a setting TOML cannot hold")


# ----------------------------------------------------------------------------- overrides
def _coerce(value, hint, where: str):
    """Check ``value`` against the type ``hint`` (int, float, str, bool, list[str], X | None)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r}: expected a list, e.g. [\"a\", \"b\"]")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r}: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}: expected a string")
        return value
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: expected a table of fields")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def set_value(cfg: RunConfig, key: str, value, source: str = "--set") -> None:
    """Set ``section.field`` (or ``preset``, or ``model.<BlackMambaConfig field>``) to ``value``."""
    parts = key.split(".")
    if parts == ["preset"]:
        cfg.preset = _coerce(value, str, "preset")
        return
    if len(parts) != 2:
        raise ConfigError(f"{source}: {key!r} is not a setting: use section.field, e.g. optim.lr "
                          f"(sections: {', '.join(SECTIONS)})")
    section, name = parts
    if section == "model":
        known = {f.name: f for f in dataclasses.fields(BlackMambaConfig)}
        if name not in known:
            raise ConfigError(f"{source}: model.{name} is not a model field (known: {', '.join(sorted(known))})")
        cfg.model[name] = value  # checked by BlackMambaConfig when the model config is resolved
        return
    sub = getattr(cfg, section, None) if section in SECTIONS[1:] else None
    if sub is None:
        raise ConfigError(f"{source}: unknown section {section!r} in {key!r} (sections: {', '.join(SECTIONS)})")
    hints = typing.get_type_hints(type(sub))
    if name not in hints:
        raise ConfigError(f"{source}: {section}.{name} is not a setting (known: "
                          f"{', '.join(f'{section}.{n}' for n in hints)})")
    setattr(sub, name, _coerce(value, hints[name], f"{section}.{name}"))


def apply_dict(cfg: RunConfig, d: dict, source: str) -> None:
    """Apply a nested dict (from TOML or a saved train_config.json)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a table of settings")
    for k, v in d.items():
        if k in SECTIONS:
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: [{k}] must be a table of settings")
            for name, value in v.items():
                set_value(cfg, f"{k}.{name}", value, source)
        elif k == "preset":
            set_value(cfg, k, v, source)
        else:
            raise ConfigError(f"{source}: unknown key {k!r} (known: preset, {', '.join(SECTIONS)})")


def parse_assignment(text: str) -> tuple[str, object]:
    """``a.b=value``: the value is read as a TOML value (number, true/false, "string", [list]),
    or taken as a plain string when it is not one (``train.device=cpu``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-3")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not a valid TOML file ({e})") from None


def build_config(preset_name: str | None = None, toml_path: Path | None = None,
                 assignments: list[str] = ()) -> RunConfig:
    """Defaults → ``--config file.toml`` → ``--preset`` → ``--set`` overrides, then validated."""
    cfg = RunConfig()
    if toml_path is not None:
        apply_dict(cfg, load_toml(Path(toml_path)), str(toml_path))
    if preset_name is not None:
        set_value(cfg, "preset", preset_name, "--preset")
    for text in assignments:
        key, value = parse_assignment(text)
        set_value(cfg, key, value)
    cfg.validate()
    return cfg
