"""Training metrics: one JSON object per line in ``RUN_DIR/metrics.jsonl`` (always), TensorBoard
scalars optionally (imported only when asked for).

Records: ``{"type": "train", "step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "router"}``,
``{"type": "val", "step", "val_loss", "val_bpb", "val_tokens", "val_bytes", "eval_s"}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError

METRICS_NAME = "metrics.jsonl"


class RouterStats:
    """Per MoE layer, tokens per expert and Sinkhorn iterations summed over the forwards since the last reset."""

    def __init__(self):
        self.counts: dict[int, torch.Tensor] = {}
        self.iters: dict[int, int] = {}
        self.calls: dict[int, int] = {}

    def add(self, stats: list[dict]) -> None:
        """Add ``model.routing_stats()`` of one forward."""
        for s in stats:
            i = s["layer"]
            c = s["tokens_per_expert"].detach().cpu().long()
            self.counts[i] = self.counts[i] + c if i in self.counts else c
            self.iters[i] = self.iters.get(i, 0) + int(s["sinkhorn_iters"])
            self.calls[i] = self.calls.get(i, 0) + 1

    def summary(self) -> list[dict]:
        """Per layer: token fraction per expert, max/mean load (1.0 = perfectly balanced), mean Sinkhorn iterations."""
        out = []
        for i in sorted(self.counts):
            c = self.counts[i].double()
            total = float(c.sum())
            frac = (c / total).tolist() if total > 0 else [0.0] * len(c)
            out.append({"layer": i, "fraction": [round(f, 5) for f in frac],
                        "max_load": round(float(c.max() / c.mean()), 4) if total > 0 else 0.0,
                        "sinkhorn_iters": round(self.iters[i] / self.calls[i], 3)})
        return out

    def all_reduce(self, world) -> None:
        """Sum every rank's counts (each rank routed its own tokens); the Sinkhorn iterations become the ranks'
        mean. A collective: every rank calls it at the same step."""
        if not world.distributed or not self.counts:
            return
        layers = sorted(self.counts)
        counts = world.sum(torch.stack([self.counts[i] for i in layers]).to(world.comm_device)).cpu()
        iters = world.sum(torch.tensor([float(self.iters[i]) for i in layers], dtype=torch.float64,
                                       device=world.comm_device)).cpu()
        for k, i in enumerate(layers):
            self.counts[i] = counts[k]
            self.iters[i] = float(iters[k]) / world.size

    def reset(self) -> None:
        self.counts.clear()
        self.iters.clear()
        self.calls.clear()


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.path = Path(run_dir) / METRICS_NAME
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard = true needs the tensorboard package: "
                                  "pip install tensorboard") from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k not in ("type", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{record['type']}/{k}", v, step)
            for r in record.get("router", []):
                self._tb.add_scalar(f"router/layer{r['layer']}_max_load", r["max_load"], step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    """Every complete record of a metrics file (a line torn by a crash is skipped)."""
    out = []
    p = Path(path)
    if p.is_file():
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records up to ``step`` (a resumed run redoes the later steps)."""
    from ..files import write_bytes

    records = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    write_bytes(Path(path), "".join(json.dumps(r) + "\n" for r in records).encode())
