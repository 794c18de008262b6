"""The training loop: AdamW + warmup/cosine, gradient accumulation and clipping, autocast where it helps,
periodic validation (loss and bits per byte), router statistics, metrics, checkpoints and exact resume.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` windows of ``seq_len`` tokens; the
data position is the number of windows consumed (see ``MixtureSampler``: one stream, or a weighted mixture), so a
resumed run reads exactly the windows the uninterrupted run would have read.

With N processes (torchrun; ``blackmamba.parallel``), ``batch_size`` stays the global micro-batch: rank r reads
windows [r b/N, (r+1) b/N) of each one, the gradients are averaged over the ranks and the MoE layers' Sinkhorn
balances all the ranks' tokens together, so N processes follow the one-process loss curve. Rank 0 alone prints,
shows the progress bar and writes metrics; every rank takes part in validation and checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError
from ..data.dataset import MixtureSampler
from ..data.prepare import PreparedData
from ..model import BlackMambaLM
from ..parallel.apply import clip_grad_norm, drop_unused_expert_grads, parallelize
from ..parallel.world import World
from .checkpoints import (Progress, latest_checkpoint, load_checkpoint, prune_checkpoints, publish_model,
                          save_checkpoint)
from .config import RunConfig
from .metrics import MetricsLog, RouterStats, truncate_metrics
from .optim import build_optimizer
from .precision import autocast as precision_autocast
from .schedule import lr_at
from .validate import evaluate


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite."""


@dataclass
class RunResult:
    progress: Progress
    last_val: dict | None
    last_loss: float | None
    tokens_per_s: float


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = cuda, but no CUDA device is available")
    return torch.device(name)


def _clock(seconds: float) -> str:
    """A duration for a progress line: 45s, 3m05s, 2h07m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _flushed_print(msg: str) -> None:
    print(msg, flush=True)


class Trainer:
    """Trains ``cfg``'s model on ``data`` into ``run_dir``.

    ``progress_bar``: a tqdm bar on stderr. Without it, ``run`` passes a one-line progress record
    (step, percentage, mean loss and training tokens/s since the previous line, wall time since ``run``
    started and, from the second line on, the time left at the wall time per step since the first line,
    validation and checkpoints included) to ``log`` after the first step, so that the user sees the run
    started, and then at most every ``progress_every_s`` seconds (0: every step), so that a run under
    nohup, in CI or piped to a file shows it is alive; with the bar, no such lines are logged. The first
    step is left out of the time left because it can include one-time work (compiling the CPU kernels).
    ``log`` receives every message the trainer prints; the default flushes, since a redirected stdout is
    block-buffered.
    """

    def __init__(self, run_dir: Path, cfg: RunConfig, data: PreparedData, *, progress_bar: bool = True,
                 log=_flushed_print, progress_every_s: float = 30.0, world: World | None = None):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.data = data
        self.world = world or World(device=pick_device(cfg.train.device))
        cfg.validate_world(self.world.size)
        self.progress_bar = progress_bar and self.world.main
        self.log = log if self.world.main else (lambda msg: None)
        self.progress_every_s = progress_every_s
        self.device = self.world.device
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)  # every rank initialises the whole model alike, then keeps its shards
        model = BlackMambaLM(cfg.model_config(data.tokenizer.vocab_size))  # on the CPU: FSDP moves only the shards
        self.model = model if self.world.distributed else model.to(self.device)
        if cfg.train.activation_checkpointing:
            from .precision import enable_activation_checkpointing

            enable_activation_checkpointing(self.model)
        parallelize(self.model, self.world, cfg.parallel.sinkhorn_scope)
        self.model.train()
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        parts = data.components
        self.sampler = MixtureSampler([c.train for c in parts], [c.weight for c in parts], cfg.data.seq_len,
                                      cfg.train.seed, [c.name for c in parts])
        self.progress = Progress()
        self.last_checkpoint: Path | None = None
        # the unsharded model that writes the samples: the model itself on one process; a sharded run's rank 0 reads
        # the run folder's at the end (keeping a whole copy during the run would cost its memory all along)
        self.whole_model = None if self.world.distributed else self.model
        if self.world.distributed:
            self._agree("data (corpus and tokenizer)", json.dumps(self.data_key(), sort_keys=True))

    # ------------------------------------------------------------------ resume
    def _agree(self, what: str, mine: str) -> str:
        """Rank 0's ``mine``, checked equal on every rank (a collective): the ranks must train on the same data and
        resume from the same checkpoint, whatever each machine's cache or file system shows it."""
        theirs = self.world.broadcast_text(mine)
        if theirs != mine:
            raise ConfigError(f"rank {self.world.rank}: its {what} differs from rank 0's ({mine[:80]} vs "
                              f"{theirs[:80]}): give every machine the same data and run folder")
        return theirs

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint, if any; returns whether one was found."""
        path = latest_checkpoint(self.run_dir)
        if self.world.distributed:
            self._agree("latest checkpoint", str(path) if path else "")
        if path is None:
            return False
        progress, data_key = load_checkpoint(path, self.model, self.optimizer, self.world)
        if data_key != self.data_key():
            raise ConfigError(f"{path} was trained on other data (corpus or tokenizer changed since the run started): "
                              f"resume with the same data, or start a new run")
        self.progress = progress
        self.last_checkpoint = path
        if self.world.main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.progress.step)
        return True

    # ------------------------------------------------------------------ pieces
    def data_key(self) -> dict:
        """What the data position refers to: the corpus and the tokenizer."""
        meta = self.data.train.meta
        return {"corpus_sha256": meta["corpus_sha256"], "tokenizer_sha256": meta["tokenizer_sha256"]}

    def _checkpoint(self) -> None:
        c = self.cfg.train
        self.last_checkpoint = save_checkpoint(
            self.run_dir, model=self.model, optimizer=self.optimizer, tokenizer=self.data.tokenizer,
            run_config=self.cfg, progress=self.progress, data_key=self.data_key(), world=self.world)
        if self.world.main:
            publish_model(self.last_checkpoint, self.run_dir)  # RUN_DIR itself: the latest model
            prune_checkpoints(self.run_dir, c.keep_checkpoints)
        self.world.wait_for_main()  # rank 0's writes take as long as they take; then it waits timeout_s at most

    def _diverged(self, what: str, value: float) -> TrainingDiverged:
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was written yet")
        return TrainingDiverged(f"{what} is {value} at step {self.progress.step + 1}; stopped ({where}). "
                                f"Try a lower optim.lr or a smaller optim.grad_clip.")

    def validate(self, autocast) -> dict:
        """Loss and bits per byte on the validation split; with a mixture, scored component by component
        (``val_by_component``: each one's held-out text alone) and summed into the whole split's numbers."""
        o, L = self.cfg.optim, self.cfg.data.seq_len
        parts = self.data.components
        if len(parts) == 1:
            return evaluate(self.model, self.data.val, L, o.batch_size, autocast, self.world)
        each = {c.name: evaluate(self.model, c.val, L, o.batch_size, autocast, self.world) for c in parts}
        nll = sum(r["val_loss"] * r["val_tokens"] for r in each.values())
        tokens, nbytes = sum(r["val_tokens"] for r in each.values()), sum(r["val_bytes"] for r in each.values())
        return {"val_loss": nll / max(tokens, 1), "val_bpb": nll / math.log(2) / max(nbytes, 1),
                "val_tokens": tokens, "val_bytes": nbytes,
                "val_by_component": {name: {"val_loss": round(r["val_loss"], 5), "val_bpb": round(r["val_bpb"], 5),
                                            "val_bytes": r["val_bytes"]}
                                     for name, r in each.items() if r["val_bytes"]}}

    def _mixture_record(self) -> dict:
        """With a mixture: each component's share of the windows read so far, and its epochs."""
        if len(self.sampler.counts) == 1:
            return {}
        k = self.progress.samples
        got = self.sampler.windows_per_component(k)
        return {"mixture": {name: {"share": round(n / max(k, 1), 5), "epochs": round(e, 4)}
                            for name, n, e in zip(self.sampler.names, got, self.sampler.epochs(k))}}

    # ------------------------------------------------------------------ loop
    def run(self) -> RunResult:
        c, o, d = self.cfg.train, self.cfg.optim, self.cfg.data
        model, opt = self.model, self.optimizer
        autocast = precision_autocast(self.device, c.precision)
        world = self.world
        metrics = MetricsLog(self.run_dir, tensorboard=c.tensorboard) if world.main else None
        local = o.batch_size // world.size  # this rank's windows of each micro-batch
        router = RouterStats()
        params = [p for p in model.parameters() if p.requires_grad]
        tokens_per_step = o.grad_accum * o.batch_size * d.seq_len
        bar = None
        if self.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.steps, initial=self.progress.step, unit="step", dynamic_ncols=True, leave=True)
        last_val, last_loss = None, None
        window_loss, window_steps, window_time = 0.0, 0, 0.0
        # the plain progress lines (no bar): when run started, when (and at which step) the first line was
        # logged, sums since the last line
        start_wall, first = time.monotonic(), None
        line_wall, line_loss, line_steps, line_time = None, 0.0, 0, 0.0
        try:
            while self.progress.step < c.steps:
                step = self.progress.step
                lr = lr_at(step, lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps, total_steps=c.steps)
                for g in opt.param_groups:
                    g["lr"] = lr
                t0 = time.perf_counter()
                loss_sum = 0.0
                step_counts: dict[int, torch.Tensor] = {}  # per MoE block: tokens per expert this step
                for _ in range(o.grad_accum):
                    x, y = self.sampler.batch(self.progress.samples + world.rank * local, local)
                    self.progress.samples += o.batch_size
                    with autocast:
                        loss = model(x.to(self.device), targets=y.to(self.device)).loss
                    value = world.mean(float(loss.detach()))  # every rank the same: they stop together
                    if not math.isfinite(value):
                        raise self._diverged("the training loss", value)
                    (loss / o.grad_accum).backward()
                    loss_sum += value
                    stats = model.routing_stats()
                    router.add(stats)
                    for st in stats if world.distributed else ():  # for drop_unused_expert_grads
                        n, i = st["tokens_per_expert"].detach(), st["layer"]
                        step_counts[i] = step_counts[i] + n if i in step_counts else n
                if step_counts:
                    layers = sorted(step_counts)
                    total = world.sum(torch.stack([step_counts[i] for i in layers]).to(world.comm_device)).cpu()
                    drop_unused_expert_grads(model, dict(zip(layers, total)))
                norm = clip_grad_norm(params, o.grad_clip if o.grad_clip > 0 else math.inf, world)
                if not math.isfinite(norm):
                    raise self._diverged("the gradient norm", norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                self.progress.step += 1
                self.progress.tokens += tokens_per_step
                self.progress.elapsed_s += dt
                last_loss = loss_sum / o.grad_accum
                window_loss += last_loss
                window_steps += 1
                window_time += dt
                step = self.progress.step
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
                else:
                    line_loss += last_loss
                    line_steps += 1
                    line_time += dt
                    now = time.monotonic()
                    if line_wall is None or now - line_wall >= self.progress_every_s:
                        msg = (f"step {step}/{c.steps} ({100 * step // c.steps}%)  loss {line_loss / line_steps:.3f}  "
                               f"{tokens_per_step * line_steps / line_time:,.0f} tok/s  "
                               f"elapsed {_clock(now - start_wall)}")
                        if first is None:
                            first = (now, step)
                        else:
                            msg += f"  eta {_clock((now - first[0]) / (step - first[1]) * (c.steps - step))}"
                        self.log(msg)
                        line_wall, line_loss, line_steps, line_time = now, 0.0, 0, 0.0
                if step % c.log_every == 0 or step == c.steps:
                    router.all_reduce(world)
                    if metrics is not None:
                        metrics.write({"type": "train", "step": step, "loss": round(window_loss / window_steps, 5),
                                       "lr": lr, "grad_norm": round(norm, 5), "tokens": self.progress.tokens,
                                       "tokens_per_s": round(tokens_per_step * window_steps / window_time, 1),
                                       "elapsed_s": round(self.progress.elapsed_s, 2), "router": router.summary(),
                                       **self._mixture_record(),
                                       **({"world_size": world.size} if world.distributed else {})})
                    window_loss, window_steps, window_time = 0.0, 0, 0.0
                    router.reset()
                if step % c.eval_every == 0 or step == c.steps:
                    t1 = time.perf_counter()
                    last_val = self.validate(autocast)
                    if metrics is not None:
                        metrics.write({"type": "val", "step": step, **last_val,
                                       "eval_s": round(time.perf_counter() - t1, 2)})
                    msg = (f"step {step}/{c.steps}: train loss {last_loss:.3f}, val loss {last_val['val_loss']:.3f}, "
                           f"val {last_val['val_bpb']:.3f} bits/byte")
                    if "val_by_component" in last_val:
                        msg += " (" + ", ".join(f"{name} {v['val_bpb']:.3f}"
                                                for name, v in last_val["val_by_component"].items()) + ")"
                    (bar.write if bar is not None else self.log)(msg)
                if step % c.checkpoint_every == 0 or step == c.steps:
                    self._checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
        tps = self.progress.tokens / self.progress.elapsed_s if self.progress.elapsed_s > 0 else 0.0
        return RunResult(self.progress, last_val, last_loss, tps)
