"""``blackmamba eval MODEL``: lm-evaluation-harness tasks, or perplexity / bits per byte of a text file.

    blackmamba eval runs/shakespeare --text held_out.txt                   # carried state, whole file
    blackmamba eval runs/shakespeare --text held_out.txt --window 512      # sliding windows (stride 256)
    blackmamba eval Zyphra/BlackMamba-1.5B --tokenizer EleutherAI/gpt-neox-20b --tasks lambada_openai,piqa
    blackmamba eval runs/shakespeare --tasks my_tasks/quiz.yaml --limit 20  # a task file of your own

Perplexity: ``eval.perplexity``; tasks: ``eval.tasks`` (through the lm-eval adapter, ``eval.lm_eval_adapter``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import add_quantize_option

DTYPES = ("float32", "bfloat16", "float16", "auto")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder (native, release or transformers format) or hub id")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--tasks", help="comma-separated lm-eval task names, groups or task YAML files")
    what.add_argument("--text", type=Path, metavar="FILE", help="a UTF-8 text file: perplexity and bits per byte")
    p.add_argument("--tokenizer", help="tokenizer.json, a folder holding one, or a hub id (default: the model's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default: float32)")
    add_quantize_option(p)
    p.add_argument("--output", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
    tasks = p.add_argument_group("lm-eval tasks (--tasks)")
    tasks.add_argument("--limit", type=float, help="at most N examples per task (a fraction if < 1)")
    tasks.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    tasks.add_argument("--batch-size", type=int, default=1, help="contexts / prompts per forward (default 1)")
    tasks.add_argument("--include-path", action="append", type=Path, default=[], metavar="DIR",
                       help="a folder of task YAML files (repeatable)")
    text = p.add_argument_group("text file (--text)")
    text.add_argument("--window", type=int, help="sliding windows of N tokens instead of carrying the state")
    text.add_argument("--stride", type=int, help="tokens newly scored per window (default: window / 2)")


def run(args: argparse.Namespace) -> int:
    from . import UserError

    if args.text is None and (args.window is not None or args.stride is not None):
        raise UserError("--window and --stride go with --text")
    if args.tasks is None and args.stride is not None and args.window is None:
        raise UserError("--stride needs --window")
    if args.tasks is None and (args.limit is not None or args.num_fewshot is not None or args.include_path):
        raise UserError("--limit, --num-fewshot and --include-path go with --tasks")
    try:
        results = run_text(args) if args.text is not None else run_tasks(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.output is not None:
        from ..files import write_json

        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.output, results)
    return 0


def _device(name: str | None):
    import torch

    from . import UserError

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def run_text(args) -> dict:
    from ..checkpoint import load_pretrained
    from ..eval.perplexity import score_text
    from ..eval.textstream import read_text_chunks
    from ..eval.tokenizer import load_tokenizer

    if not args.text.is_file():
        raise FileNotFoundError(f"{args.text}: no such file")
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    model = load_pretrained(args.model, dtype=args.dtype, device=_device(args.device), quantize=args.quantize,
                            group_size=args.group_size)
    # the file is read and encoded a piece at a time (bounded memory; invalid UTF-8 is a ValueError)
    score = score_text(model, tokenizer, read_text_chunks(args.text), window=args.window, stride=args.stride,
                       progress=sys.stderr.isatty())
    mode = f"sliding window {args.window}, stride {args.stride or max(1, args.window // 2)}" if args.window \
        else "carried state"
    print(f"{args.text}: {score.tokens:,} tokens, {score.bytes:,} bytes scored ({mode})")
    print(f"nll/token       {score.nll_per_token:.4f} nats")
    print(f"perplexity      {score.perplexity:.4f}")
    print(f"bits per byte   {score.bits_per_byte:.4f}")
    return {"file": str(args.text), "mode": mode, **score.to_dict()}


def run_tasks(args) -> dict:
    from lm_eval.utils import make_table

    from ..eval.tasks import evaluate_tasks

    specs = [s.strip() for s in args.tasks.split(",") if s.strip()]
    if not specs:
        raise ValueError("--tasks is empty")
    for d in args.include_path:
        if not d.is_dir():
            raise FileNotFoundError(f"--include-path {d}: no such folder")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = evaluate_tasks(args.model, specs, tokenizer=args.tokenizer, batch_size=args.batch_size,
                             device=str(_device(args.device)), dtype=args.dtype, quantize=args.quantize,
                             group_size=args.group_size, limit=limit,
                             num_fewshot=args.num_fewshot, include_paths=args.include_path)
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    return json.loads(json.dumps({k: results[k] for k in ("results", "versions", "n-shot", "config")
                                  if k in results}, default=str))
