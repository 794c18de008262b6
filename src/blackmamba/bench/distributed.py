"""The distributed-training benchmark (``blackmamba bench --distributed``): training steps of one process against
N processes (torchrun, gloo on CPU) on the same global batch, with and without expert parallelism, and the bytes
each rank really moved per step against ``blackmamba info --world-size``'s estimate (``parallel.plan``).

Each configuration runs as its own torchrun job (``python -m blackmamba.bench.distributed --worker ...``), the
jobs interleaved over ``rounds`` so that a busy machine slows all alike; each job times ``steps`` optimizer steps
(forward, backward, gradient clipping, AdamW; random tokens, the Sinkhorn routing of training) after two warm-up
steps, and its rank 0 counts the bytes of every collective by wrapping the torch.distributed calls FSDP2 and
``parallel.expert`` make:

    all_gather      FSDP's parameter all-gathers (flat buffers): received, (G - 1) / G of the output
    reduce_scatter  FSDP's gradient reduce-scatters: sent, (G - 1) / G of the input
    all_to_all      expert parallelism's token exchanges: the rows sent to other ranks (forward and backward)
    sinkhorn        the router logits' all-gather (2-D): received, (G - 1) / G of the output

and the bytes of the parameter, gradient and AdamW shards it holds (against the plan's per-rank memory terms;
the activations are ``train.memory``'s, checked on one process there).

The one-process baseline uses every core (torch threads), each of N processes 1 / N of them: the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = ("all_gather", "reduce_scatter", "all_to_all", "sinkhorn")


# ----------------------------------------------------------------------------- the worker (one torchrun job)
class CommCounter:
    """Bytes this rank moved, per kind (see the module docstring), while ``counting`` is true."""

    def __init__(self):
        import torch.distributed as dist

        from ..parallel import expert

        self.bytes = dict.fromkeys(KINDS, 0)
        self.counting = False
        ag, rs, a2a = dist.all_gather_single, dist.reduce_scatter_single, expert.all_to_all_single_autograd

        def all_gather_single(output, input, group=None, async_op=False):
            if self.counting:
                g = dist.get_world_size(group)
                kind = "all_gather" if output.dim() == 1 else "sinkhorn"
                self.bytes[kind] += output.numel() * output.element_size() * (g - 1) // g
            return ag(output, input, group=group, async_op=async_op)

        def reduce_scatter_single(output, input, op=None, group=None, async_op=False):
            if self.counting:
                g = dist.get_world_size(group)
                self.bytes["reduce_scatter"] += input.numel() * input.element_size() * (g - 1) // g
            kwargs = {} if op is None else {"op": op}
            return rs(output, input, group=group, async_op=async_op, **kwargs)

        def all_to_all(x, output_split_sizes, input_split_sizes, group):
            out = a2a(x, output_split_sizes, input_split_sizes, group)
            if self.counting:
                me, row = dist.get_rank(group), x.shape[1] * x.element_size()
                self.bytes["all_to_all"] += row * sum(n for r, n in enumerate(input_split_sizes) if r != me)
                if out.requires_grad:  # its backward sends the gradients of the received rows back
                    back = row * sum(n for r, n in enumerate(output_split_sizes) if r != me)
                    out.register_hook(lambda g: self.bytes.__setitem__("all_to_all", self.bytes["all_to_all"] + back))
            return out

        dist.all_gather_single, dist.reduce_scatter_single = all_gather_single, reduce_scatter_single
        expert.all_to_all_single_autograd = all_to_all


def _worker(args) -> None:
    import torch

    from ..config import preset
    from ..model import BlackMambaLM
    from ..parallel.apply import clip_grad_norm, parallelize
    from ..parallel.world import World
    from ..train.config import OptimConfig
    from ..train.optim import build_optimizer

    world = World.from_env(torch.device("cpu"), args.ep, timeout_s=300)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.size))
    counter = CommCounter()  # before the model is parallelised: FSDP looks the collectives up at call time
    torch.manual_seed(0)
    model = BlackMambaLM(preset(args.preset))
    parallelize(model, world)
    model.train()
    opt = build_optimizer(model, OptimConfig(), world.device)
    params = [p for p in model.parameters() if p.requires_grad]
    B, L, vocab = args.batch, args.seq, model.config.vocab_size
    local = B // world.size
    times = []
    for step in range(2 + args.steps):
        g = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, vocab, (B, L + 1), generator=g)[world.rank * local:(world.rank + 1) * local]
        counter.counting = step >= 2
        world.barrier()
        t0 = time.perf_counter()
        loss = model(tokens[:, :-1], targets=tokens[:, 1:]).loss
        loss.backward()
        clip_grad_norm(params, 1.0, world)
        opt.step()
        if step == 0:  # the rank's shards as the run holds them (DTensors' local parts)
            held = {"params": _local_bytes(params), "grads": _local_bytes(p.grad for p in params),
                    "optimizer": _local_bytes(v for p in params for k, v in opt.state[p].items() if k != "step")}
        opt.zero_grad(set_to_none=True)
        world.barrier()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    counter.counting = False
    if world.main:
        step_s = statistics.median(times)
        Path(args.out).write_text(json.dumps({
            "world_size": world.size, "ep": world.ep, "step_s": step_s, "tokens_per_s": B * L / step_s,
            "held_bytes": held,
            "bytes_per_step": {k: v / args.steps for k, v in counter.bytes.items()}}))
    world.close()


def _local_bytes(tensors) -> int:
    """Bytes of the tensors this rank holds (a DTensor's local shard)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- the parent
def _job(nproc: int, ep: int, model: str, batch: int, seq: int, steps: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", "blackmamba.bench.distributed", "--worker",
           "--preset", model, "--batch", str(batch), "--seq", str(seq), "--steps", str(steps), "--ep", str(ep),
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"the {nproc}-process job failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed_bench(nproc: int = 2, quick: bool = False, rounds: int | None = None) -> dict:
    """One process vs ``nproc`` (and ``nproc`` with the experts split over them), interleaved; the measured bytes
    per step against ``parallel.plan``'s. Returns the harness's result dict (rows, notes)."""
    from ..config import preset
    from ..parallel.plan import plan_training
    from .harness import row

    model, batch, seq, steps = ("tiny", 4, 32, 2) if quick else ("small", 8, 256, 6)
    rounds = rounds or (1 if quick else 3)
    cfg = preset(model)
    experts = min(e for kind, e in cfg.layer_kinds() if kind == "moe")
    configs = [(1, 1), (nproc, 1)] + ([(nproc, nproc)] if experts % nproc == 0 else [])
    results: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for n, ep in configs:
                results[(n, ep)].append(_job(n, ep, model, batch, seq, steps, Path(tmp) / f"{n}-{ep}-{r}.json"))
    rows, notes = [], []
    one = statistics.median(x["tokens_per_s"] for x in results[(1, 1)])
    row(rows, f"train {model}, 1 process, batch {batch}×{seq}", one, "tok/s", quick=quick)
    for n, ep in configs[1:]:
        runs = results[(n, ep)]
        tps = statistics.median(x["tokens_per_s"] for x in runs)
        name = f"train {model}, {n} processes" + (f", ep {ep}" if ep > 1 else "") + f", batch {batch}×{seq}"
        row(rows, name, tps, "tok/s", baseline="1 process, same global batch", ratio=tps / one, quick=quick)
        plan = plan_training(cfg, world_size=n, ep=ep, batch=batch, seq=seq, dtype="fp32", device="cpu")
        measured = runs[-1]["bytes_per_step"]
        held = runs[-1]["held_bytes"]
        for kind in ("params", "grads", "optimizer"):
            row(rows, f"  {n} processes{f', ep {ep}' if ep > 1 else ''}: {kind} held per rank (rank 0)",
                held[kind] / 1e6, "MB", baseline="info --world-size estimate", ratio=held[kind] / getattr(plan, kind),
                quick=quick)
        for kind in KINDS:
            est = getattr(plan, kind if kind != "sinkhorn" else "sinkhorn_gather")
            if measured[kind] or est:
                row(rows, f"  {n} processes{f', ep {ep}' if ep > 1 else ''}: {kind.replace('_', '-')} per step "
                    f"(rank 0)", measured[kind] / 1e6, "MB", baseline="info --world-size estimate",
                    ratio=measured[kind] / est if est else None, quick=quick)
    notes.append(f"{os.cpu_count()} cores; 1 process uses all of them, each of {nproc} processes 1/{nproc}; median "
                 f"of {rounds} interleaved job(s) of {steps} timed steps; ratio = measured / estimate")
    return {"device": "cpu", "quick": quick, "rows": rows, "notes": notes,
            "jobs": {f"{n}x{ep}": v for (n, ep), v in results.items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m blackmamba.bench.distributed")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--preset", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--out", required=True)
    _worker(p.parse_args(argv))


if __name__ == "__main__":
    main()
