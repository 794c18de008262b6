"""Run checkpoints: everything needed to continue a run exactly where it stopped.

``RUN_DIR/checkpoints/step-0000500/`` holds

    config.json, model.safetensors, tokenizer.json   the model (loadable by load_pretrained / generate)
    train_config.json                                the resolved run configuration
    trainer_state.safetensors                        optimizer moments, RNG states
    trainer_state.json                               step, data position (and which data), tokens,
                                                     optimizer hyper-parameters

The folder is written under a temporary name and renamed when complete (``blackmamba.files.atomic_dir``), so a
crash (even SIGKILL) never leaves a torn checkpoint; ``trainer_state.json`` is written last. No pickles anywhere.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import save_pretrained
from ..files import atomic_dir, atomic_file, remove, stale_temporaries, write_json
from ..data.tokenizer import TOKENIZER_NAME, TextTokenizer
from .config import RunConfig

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "train_config.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    samples: int = 0  # training windows consumed: the data position
    tokens: int = 0  # training tokens consumed
    elapsed_s: float = 0.0  # training time so far (excluding validation)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / STATE_JSON).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------- optimizer state
def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- save / load
def save_model_files(directory: Path, model, tokenizer: TextTokenizer) -> None:
    """config.json + model.safetensors + tokenizer.json: what ``blackmamba generate DIR`` reads."""
    save_pretrained(model, directory)
    tokenizer.save(Path(directory) / TOKENIZER_NAME)


def save_checkpoint(run_dir: Path, *, model, optimizer, tokenizer: TextTokenizer, run_config: RunConfig,
                    progress: Progress, data_key: dict) -> Path:
    """Write checkpoint ``step-N`` atomically (temp folder + rename, replacing one of the same step); returns its
    path. ``data_key`` identifies the training data (corpus and tokenizer sha256) the data position refers to."""
    final = checkpoint_dir(run_dir, progress.step)
    with atomic_dir(final) as tmp:
        save_model_files(tmp, model, tokenizer)
        run_config.save(tmp / RUN_CONFIG)
        tensors, opt_meta = _optimizer_tensors(optimizer)
        tensors.update(_rng_tensors())
        with atomic_file(tmp / STATE_TENSORS) as f:
            save_file(tensors, str(f))
        write_json(tmp / STATE_JSON, {"progress": asdict(progress), "data": data_key, "optimizer": opt_meta})
    return final


def load_checkpoint(path: Path, model, optimizer) -> tuple[Progress, dict]:
    """Load weights, optimizer state and RNG states from checkpoint ``path``; returns (progress, data key)."""
    from ..checkpoint import check_state_dict, read_state_dict

    path = Path(path)
    sd = read_state_dict(path)
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd, strict=True)
    meta = json.loads((path / STATE_JSON).read_text())
    tensors = load_file(str(path / STATE_TENSORS))
    optimizer.load_state_dict(_optimizer_state(tensors, meta["optimizer"]))
    _restore_rng(tensors)
    return Progress(**meta["progress"]), meta["data"]


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recent complete checkpoints."""
    for _, p in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove what writers killed mid-write left in the run folder and its checkpoints folder (temporary
    files and folders); only the process holding the run folder's lock may call this. Returns what it removed."""
    stale = stale_temporaries(run_dir) + stale_temporaries(Path(run_dir) / CHECKPOINTS)
    remove(stale)
    return stale
