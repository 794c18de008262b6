"""Run checkpoints: everything needed to continue a run exactly where it stopped, with any number of processes.

``RUN_DIR/checkpoints/step-0000500/`` holds

    config.json, model.safetensors, tokenizer.json   the model, whole (loadable by load_pretrained / generate)
    train_config.json                                the resolved run configuration
    state/*.safetensors                              the training state as torch.distributed.checkpoint (DCP)
                                                     shards, one file per rank: model weights and AdamW's
                                                     moments and step counts, under global names
    rng/rank-NNNNN.safetensors                       each rank's RNG states
    trainer_state.json                               step, data position (and which data), tokens, optimizer
                                                     hyper-parameters, the writers' world size (written last)

The shards record which slice of which tensor they hold (DCP's safetensors layout, ``HuggingFaceStorageWriter``),
so a checkpoint written by N processes loads into M processes, any M, FSDP and expert parallelism included:
``load_checkpoint`` asks each rank's tensors for exactly their slices. The names are those of the unwrapped,
unparallelised model (``decoder.layers.3.mixer.local_experts.5.linear_fc1.weight``), so the layout of the run
that wrote a checkpoint never shows in it. No pickles anywhere (DCP's own metadata file, a pickle, is not used:
the shards' safetensors headers carry the layout).

The folder is written under a temporary name and renamed when complete, after every rank wrote its shard (a
barrier), by rank 0, which writes ``trainer_state.json`` last: a crash (even SIGKILL of any rank) never leaves a
torn checkpoint. With several machines the run folder must be on a file system they share.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError, save_pretrained
from ..files import atomic_file, commit_dir, remove, stale_temporaries, temp_dir, write_json
from ..data.tokenizer import TOKENIZER_NAME, TextTokenizer
from .config import RunConfig

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "train_config.json"
STATE_JSON = "trainer_state.json"
STATE_DIR = "state"
RNG_DIR = "rng"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_WRAPPER = "_checkpoint_wrapped_module."


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


# ----------------------------------------------------------------------------- the training state as named tensors
def _name(model, name: str) -> str:
    from ..parallel.expert import global_name

    return global_name(model, name).replace(_WRAPPER, "")


def _init_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's per-parameter state as its first step creates it (zeros), where it does not exist yet, so that a
    checkpoint can be loaded into it in place."""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def training_tensors(model, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The model's and the optimizer's tensors under global names — the tensors themselves (DTensors when
    sharded), so that loading a checkpoint into this dict loads it into the run:

        model/<name>                    every state_dict entry
        optim/<name>/exp_avg, .../exp_avg_sq, .../step   AdamW's state of parameter <name>
    """
    _init_adamw_state(optimizer)
    out = {f"model/{_name(model, k)}": v for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        for k, v in optimizer.state[p].items():
            out[f"optim/{_name(model, name)}/{k}"] = v
    return out


def _optimizer_meta(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


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
MODEL_FILES = ("config.json", "model.safetensors", TOKENIZER_NAME)  # what save_model_files writes


def save_model_files(directory: Path, model, tokenizer: TextTokenizer) -> None:
    """config.json + model.safetensors + tokenizer.json: what ``blackmamba generate DIR`` reads."""
    save_pretrained(model, directory)
    tokenizer.save(Path(directory) / TOKENIZER_NAME)


def publish_model(checkpoint: Path, run_dir: Path) -> None:
    """Make the run folder's model (``MODEL_FILES``) the checkpoint's: copied, each file atomically, rather than
    serialised a second time."""
    for name in MODEL_FILES:
        with atomic_file(Path(run_dir) / name) as tmp:
            shutil.copyfile(Path(checkpoint) / name, tmp)


@contextlib.contextmanager
def _dcp(world):
    """DCP's calls, without its warning that a one-process run is one process, and with the first rank's error
    raised as itself (a full disk stays an OSError) instead of DCP's CheckpointException, a BaseException."""
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        if world is None or not world.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            yield
        except CheckpointException as e:
            failures = sorted(e.failures.items())
            if not failures:
                raise
            raise failures[0][1][0] from None


def _whole_model(model, state_dir: Path):
    """A plain (unsharded, CPU) copy of a parallelised ``model``, read back from the checkpoint's shards just
    written: no rank has to gather the whole model in its memory, and with expert parallelism no rank has it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from ..model import BlackMambaLM

    with torch.device("meta"):
        whole = BlackMambaLM(model.config)
    whole.to_empty(device="cpu")
    sd = {f"model/{k}": v for k, v in whole.state_dict().items()}
    with _dcp(None):
        dcp.load(sd, storage_reader=HuggingFaceStorageReader(str(state_dir)), no_dist=True)
    return whole


def save_checkpoint(run_dir: Path, *, model, optimizer, tokenizer: TextTokenizer, run_config: RunConfig,
                    progress: Progress, data_key: dict, world=None):
    """Write checkpoint ``step-N`` atomically (every rank calls this; see the module docstring); returns its path.
    Rank 0 is still writing when the others return: the caller waits for it (``world.barrier(patient=True)``).
    ``data_key`` identifies the training data (corpus and tokenizer sha256) the data position refers to."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from ..parallel.world import World

    world = world or World()
    final = checkpoint_dir(run_dir, progress.step)
    tmp = Path(world.broadcast_text(str(temp_dir(final)) if world.main else None))
    try:
        with _dcp(world):
            dcp.save(training_tensors(model, optimizer),
                     storage_writer=HuggingFaceStorageWriter(str(tmp / STATE_DIR), save_distributed=True),
                     no_dist=not world.distributed)
        (tmp / RNG_DIR).mkdir(exist_ok=True)
        with atomic_file(tmp / RNG_DIR / f"rank-{world.rank:05d}.safetensors") as f:
            save_file(_rng_tensors(), str(f))
        world.barrier(patient=True)  # every shard is on disk
        if world.main:
            save_model_files(tmp, _whole_model(model, tmp / STATE_DIR) if world.distributed else model, tokenizer)
            run_config.save(tmp / RUN_CONFIG)
            write_json(tmp / STATE_JSON, {"progress": asdict(progress), "data": data_key,
                                          "optimizer": {"param_groups": _optimizer_meta(optimizer)},
                                          "world_size": world.size, "ep": world.ep})
            commit_dir(tmp, final)
    except BaseException:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint(path: Path, model, optimizer, world=None) -> tuple[Progress, dict]:
    """Load weights, optimizer state and RNG states from checkpoint ``path`` into this rank's (possibly sharded)
    model and optimizer, whatever the number of processes that wrote it; returns (progress, data key). Every
    rank calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from ..parallel.world import World

    world = world or World()
    path = Path(path)
    meta = json.loads((path / STATE_JSON).read_text())
    state = path / STATE_DIR
    if not state.is_dir() and (path / V1_TENSORS).is_file():
        if world.distributed:
            raise CheckpointError(f"{path} was written by an earlier blackmamba (one file per checkpoint): resume it "
                                  f"on one process first; its next checkpoint is in the format any number reads")
        _load_v1(path, model, optimizer, meta)
        return Progress(**meta["progress"]), meta["data"]
    if not state.is_dir():
        raise CheckpointError(f"{path}: no {STATE_DIR}/ folder: not a complete training checkpoint")
    tensors = training_tensors(model, optimizer)
    try:
        with _dcp(world):
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(state)), no_dist=not world.distributed)
    except (RuntimeError, ValueError, KeyError) as e:  # the first line names the tensor; a failed collective stays
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, RuntimeError) and not any(k in msg for k in ("Missing key", "size", "shape", "mismatch")):
            raise
        raise CheckpointError(f"{path}: the training state does not fit this run ({msg})") from None
    for group, saved in zip(optimizer.param_groups, meta["optimizer"]["param_groups"]):
        group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})
    rng = path / RNG_DIR / f"rank-{world.rank:05d}.safetensors"
    if not rng.is_file():  # written by fewer processes: rank 0's states
        rng = path / RNG_DIR / f"rank-{0:05d}.safetensors"
    _restore_rng(load_file(str(rng)))
    return Progress(**meta["progress"]), meta["data"]


V1_TENSORS = "trainer_state.safetensors"  # the one-process format before sharded checkpoints


def _load_v1(path: Path, model, optimizer, meta: dict) -> None:
    """Resume a checkpoint of the earlier one-process format: model.safetensors, and the optimizer's tensors as
    ``optimizer.<param index>.<name>`` in trainer_state.safetensors with its other state in the JSON."""
    from ..checkpoint import check_state_dict, read_state_dict

    sd = read_state_dict(path)
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd, strict=True)
    tensors = load_file(str(path / V1_TENSORS))
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["optimizer"].get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["optimizer"]["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    _restore_rng(tensors)


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
