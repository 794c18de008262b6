"""``blackmamba compare --out DIR``: train the four architectures alike, measure them, write the results and a report.

DIR ends up holding::

    compare.json          the comparison's settings (scale, --data, --set, --steps): a re-run must give the same
    configs/NAME.toml     each architecture's whole run configuration (``blackmamba train --config`` reads it)
    NAME/                 an ordinary run folder per architecture (``blackmamba generate DIR/NAME`` works on it)
    results.json          one entry per architecture (sizes, FLOPs, validation, latency), Sinkhorn, expert usage
    report.md, plots/     the figures and the table, with the commands that produced them

A re-run skips the architectures that finished and resumes an interrupted one from its last checkpoint; the
measurements (latency, Sinkhorn) are taken again, all four together. ``--scale paper`` writes the configurations
and a torchrun launch script for a GPU cluster instead of training.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Callable

from ..config import ConfigError, compact_pattern
from ..files import FolderLock, atomic_file, write_json
from .archs import SCALES, Architecture, architectures, base_config

SETTINGS = "compare.json"
RESULTS = "results.json"


class TrainingFailed(RuntimeError):
    """An architecture's run stopped (it diverged, or a write failed); its folder keeps its last checkpoint."""


def _train_args(run_dir: Path, config: Path, resume: bool, progress: bool) -> list[str]:
    """``blackmamba train``'s arguments for one architecture (a started run resumes its saved configuration)."""
    args = ["--out", str(run_dir)] + (["--resume"] if resume else ["--config", str(config)])
    return args + ([] if progress else ["--no-progress"])


def _finished(run_dir: Path, steps: int) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text())["steps"] >= steps
    except (OSError, ValueError, KeyError):
        return False


def _check_settings(out: Path, settings: dict) -> None:
    """The folder's comparison must be this one: its runs were trained with these settings."""
    path = out / SETTINGS
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: unreadable ({e}); choose another --out") from None
        if saved != settings:
            diff = ", ".join(f"{k}: {saved.get(k)!r} there, {settings[k]!r} now" for k in settings
                             if saved.get(k) != settings[k])
            raise ConfigError(f"{out} holds a comparison with other settings ({diff}): choose another --out")
    else:
        write_json(path, settings)


def _write_configs(out: Path, archs: list[Architecture]) -> dict[str, Path]:
    (out / "configs").mkdir(exist_ok=True)
    paths = {}
    for a in archs:
        paths[a.name] = out / "configs" / f"{a.name}.toml"
        with atomic_file(paths[a.name]) as tmp:
            tmp.write_text(f"# blackmamba compare: architecture {a.name}\n" + a.run.to_toml(), encoding="utf-8")
    return paths


def _static_entry(a: Architecture, model_cfg=None) -> dict:
    """What the configuration alone says: layers, parameters, training FLOPs."""
    cfg = model_cfg or a.model
    total, active = cfg.param_counts()
    d, o, t = a.run.data, a.run.optim, a.run.train
    tokens = t.steps * o.grad_accum * o.batch_size * d.seq_len
    per_token = cfg.train_flops_per_token(d.seq_len, t.activation_checkpointing)
    return {"name": a.name, "layers": cfg.layers, "pattern": compact_pattern(cfg.layers),
            "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size,
            "params_total": total, "params_active": active, "train_flops_per_token": per_token,
            "train_tokens": tokens, "train_flops": per_token * tokens}


def _val_curve(run_dir: Path, a: Architecture, flops_per_token: int) -> list[dict]:
    from ..train.metrics import read_metrics

    o, d = a.run.optim, a.run.data
    out = []
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if r.get("type") == "val":
            tokens = r["step"] * o.grad_accum * o.batch_size * d.seq_len
            out.append({"step": r["step"], "tokens": tokens, "flops": tokens * flops_per_token,
                        "val_loss": r["val_loss"], "val_bpb": r["val_bpb"]})
    return out


def _expert_usage(run_dir: Path) -> dict:
    """Per MoE layer: the share of each expert's tokens in every logged training window (the heatmap's rows)."""
    from ..train.metrics import read_metrics

    layers: dict[str, dict] = {}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if r.get("type") != "train":
            continue
        for s in r.get("router", []):
            entry = layers.setdefault(str(s["layer"]), {"steps": [], "fraction": []})
            entry["steps"].append(r["step"])
            entry["fraction"].append(s["fraction"])
    return layers


def _router_logits(archs: dict[str, Architecture], models: dict) -> dict:
    """The trained routers' logits (T, E) on the first held-out micro-batch (batch_size × seq_len tokens: the
    token set Sinkhorn balances in training), per MoE layer of every MoE architecture."""
    import torch

    from ..data.prepare import prepare_data

    logits = {}
    for name, model in models.items():
        moe = [i for i, blk in enumerate(model.decoder.layers) if blk.kind == "moe"]
        if not moe:
            continue
        d, o = archs[name].run.data, archs[name].run.optim
        data = prepare_data(d.paths or None, val_fraction=d.val_fraction, vocab_size=d.vocab_size,
                            tokenizer=d.tokenizer, text_field=d.text_field, mixture=d.mixture or None)
        n = min(o.batch_size * d.seq_len, len(data.val) // d.seq_len * d.seq_len)
        ids = torch.as_tensor(data.val[:n].astype("int64")).reshape(-1, d.seq_len)
        captured = {}
        hooks = [model.decoder.layers[i].mixer.register_forward_pre_hook(
            lambda mod, inp, i=i: captured.__setitem__(i, torch.nn.functional.linear(
                inp[0].reshape(-1, inp[0].shape[-1]).float(), mod.router.weight, mod.router.bias)))
            for i in moe]
        try:
            with torch.no_grad():
                model(ids)
        finally:
            for h in hooks:
                h.remove()
        for i in moe:
            logits[f"{name} layer {i}"] = captured[i]
    return logits


def compare(out, scale: str = "small", data: list[str] | None = None, assignments: list[str] = (),
            steps: int | None = None, contexts: list[int] | None = None, reps: int = 5, progress: bool = False,
            log: Callable[[str], None] = print) -> dict:
    """Run (or, for ``scale="paper"``, write) the comparison in ``out``; returns results.json's content.
    ConfigError / DataError / OutputError name a problem in the inputs; a run that fails to train raises
    TrainingFailed naming it (every run folder is kept: a re-run continues)."""
    out = Path(out).expanduser()
    base = base_config(scale, data, assignments)
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"--steps {steps!r}: must be a positive integer")
        base.train.steps = steps
        base.train.checkpoint_every = min(base.train.checkpoint_every, steps)
    given_contexts = contexts
    if contexts is not None and not contexts:
        raise ConfigError("--contexts is empty: give token counts, e.g. 128,512,2048,8192")
    contexts = sorted(set(contexts or SCALES[scale]["contexts"]))
    if not contexts or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in contexts):
        raise ConfigError(f"--contexts {contexts}: positive token counts, e.g. 128,512,2048,8192")
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ConfigError(f"--reps {reps}: must be at least 1")
    archs = architectures(base)
    lock = FolderLock(out, "comparison folder")
    try:
        _check_settings(out, {"scale": scale, "data": [str(p) for p in data or []], "set": list(assignments),
                              "steps": base.train.steps})
        configs = _write_configs(out, archs)
        command = _command(out, scale, data, assignments, steps, given_contexts, reps)
        if scale == "paper":
            return _write_paper(out, archs, configs, contexts, command, log)
        return _run(out, scale, archs, configs, contexts, reps, progress, command, log)
    finally:
        lock.release()


def _command(out: Path, scale: str, data, assignments, steps, contexts, reps) -> str:
    """The command line that makes this comparison (for the report)."""
    args = ["--out", str(out), "--scale", scale] + (["--data", *map(str, data)] if data else [])
    for text in assignments:
        args += ["--set", text]
    if steps is not None:
        args += ["--steps", str(steps)]
    if contexts is not None:
        args += ["--contexts", ",".join(map(str, contexts))]
    if reps != 5:
        args += ["--reps", str(reps)]
    return "blackmamba compare " + shlex.join(args)


def _run(out: Path, scale: str, archs: list[Architecture], configs: dict[str, Path], contexts: list[int], reps: int,
         progress: bool, command: str, log) -> dict:
    import torch

    from ..checkpoint import load_pretrained
    from ..cli import build_parser
    from ..train.run import run as train_run
    from .latency import growth, measure_latency
    from .report import write_report
    from .sinkhorn import study

    parser = build_parser()
    runs = {a.name: out / a.name for a in archs}
    for k, a in enumerate(archs, 1):
        run_dir = runs[a.name]
        if _finished(run_dir, a.run.train.steps):
            log(f"[{k}/{len(archs)}] {a.name}: finished earlier, kept ({run_dir})")
            continue
        args = ["train"] + _train_args(run_dir, configs[a.name], (run_dir / "train_config.json").is_file(), progress)
        log(f"[{k}/{len(archs)}] {a.name} ({compact_pattern(a.model.layers)}): blackmamba {shlex.join(args)}")
        status = train_run(parser.parse_args(args))
        if status != 0:
            raise TrainingFailed(f"{a.name}: training stopped (exit status {status}); its run folder {run_dir} keeps "
                               f"its last checkpoint: fix the cause and run compare again to continue")
    models = {a.name: load_pretrained(runs[a.name]) for a in archs}
    threads = torch.get_num_threads()
    if archs[0].run.train.threads:  # as trained (train.threads = 0: torch's default, one per core)
        torch.set_num_threads(archs[0].run.train.threads)
    log(f"measuring decode and prefill latency at {contexts} tokens ({reps} interleaved repetitions)")
    try:
        latency = measure_latency(models, contexts, reps=reps, log=log)
        measured_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    by_name = {a.name: a for a in archs}
    log("measuring Sinkhorn on the trained routers' logits and on synthetic ones")
    real = _router_logits(by_name, models)
    experts = max(e for a in archs for kind, e in a.model.layer_kinds() if kind == "moe")
    sinkhorn = study(real, tokens=archs[0].run.optim.batch_size * archs[0].run.data.seq_len, experts=experts)
    entries = []
    for a in archs:
        summary = json.loads((runs[a.name] / "summary.json").read_text())
        entry = _static_entry(a, models[a.name].config)  # the plan; the tokens the run did replace its count
        entry.update({"train_tokens": summary["tokens"], "train_flops": entry["train_flops_per_token"] *
                      summary["tokens"], "val_loss": summary.get("val_loss"), "val_bpb": summary.get("val_bpb"),
                      "train_seconds": summary["train_seconds"], "run": str(runs[a.name]), **latency[a.name],
                      "decode_growth": round(growth(latency[a.name]["decode_ms_per_token"]), 4),
                      "val_curve": _val_curve(runs[a.name], a, entry["train_flops_per_token"]),
                      "expert_usage": _expert_usage(runs[a.name])})
        entries.append(entry)
    results = {"scale": scale, "command": command, "contexts": contexts, "latency_reps": reps,
               "torch_threads": measured_threads, "architectures": entries, "sinkhorn": sinkhorn}
    write_json(out / RESULTS, results)
    report = write_report(out, results, configs)
    log(f"results: {out / RESULTS}\nreport:  {report}")
    return results


def _write_paper(out: Path, archs: list[Architecture], configs: dict[str, Path], contexts: list[int], command: str,
                 log) -> dict:
    """The paper-scale configurations with a launch script: the static numbers, no measurements."""
    from .report import write_report

    lines = ["#!/bin/sh", "# blackmamba compare --scale paper: each architecture on NODES machines of GPUS GPUs "
             "(torchrun; docs/distributed.md)", "set -e", ': "${NODES:=8}" "${GPUS:=8}" "${RDZV:=localhost:29500}"']
    for a in archs:
        lines.append(f"torchrun --nnodes $NODES --nproc-per-node $GPUS --rdzv-backend c10d --rdzv-endpoint $RDZV "
                     f"-m blackmamba train --out {shlex.quote(str(out / a.name))} --config "
                     f"{shlex.quote(str(configs[a.name]))}")
    script = out / "launch.sh"
    with atomic_file(script) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.chmod(0o755)
    results = {"scale": "paper", "command": command, "contexts": contexts,
               "architectures": [_static_entry(a) for a in archs], "launch": str(script)}
    write_json(out / RESULTS, results)
    report = write_report(out, results, configs)
    log(f"wrote the paper-scale configurations to {out / 'configs'} and {script} (not run here: each is a GPU "
        f"cluster's job)\nreport: {report}")
    return results
