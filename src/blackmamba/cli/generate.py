"""``blackmamba generate MODEL "prompt" ["prompt" ...]``: continue prompts with a model.

MODEL is a run directory (``blackmamba train --out``), a model folder or a hub id. The tokenizer is the
folder's ``tokenizer.json``, ``--tokenizer``, or for the release checkpoints (which ship none)
GPT-NeoX-20B's. One prompt is streamed to the terminal token by token; several prompts are generated
together in one padded batch (each comes out exactly as it would alone) and printed when done.
"""

from __future__ import annotations

import argparse
import sys

from . import add_quantize_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="run directory, model folder or hub id (owner/name)")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="text to continue (several: one batch)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="at most this many new tokens (default 200)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample among the most likely tokens holding this probability")
    p.add_argument("--min-p", type=float, help="drop tokens less likely than min-p × the most likely one")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already present (default 1: off)")
    p.add_argument("--seed", type=int, help="seed for sampling (same seed, same text; each prompt draws from a stream "
                                            "of its own)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (not printed; repeatable); EOS always stops")
    p.add_argument("--tokenizer", metavar="FILE_OR_HUB_ID", help="tokenizer.json (or hub id) to use")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    add_quantize_option(p)


def sampling_options(args) -> dict:
    """The generation options the command line gives, checked by the API's own validation
    (``generation.check_options``); a problem is a ``UserError`` naming the flag."""
    from ..generation import OptionError, check_options
    from . import UserError

    options = {"max_new_tokens": args.max_new_tokens, "do_sample": not args.greedy,
               "repetition_penalty": args.repetition_penalty}
    if not args.greedy:
        options.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                       seed=args.seed)
    try:
        check_options(**options)
    except OptionError as e:
        raise UserError("; ".join(f"--{name.replace('_', '-')} {why.removeprefix('= ')}"
                                  for name, why in e.problems)) from None
    if args.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {args.device!r}: choose auto, cpu or cuda")
    return options


def run(args: argparse.Namespace) -> int:
    from ..generation import check_prompt, encode_prompt, generate_text, load_model_and_tokenizer, stream_text
    from . import UserError

    sampling = sampling_options(args)
    max_new = sampling.pop("max_new_tokens")
    try:
        for p in args.prompts:
            check_prompt(p)  # before the model loads
    except ValueError as e:
        raise UserError(str(e)) from None
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.device, args.quantize, args.group_size)
    for p in args.prompts:
        try:
            encode_prompt(tok, p)
        except ValueError as e:
            raise UserError(str(e)) from None
    if len(args.prompts) == 1:
        prompt = args.prompts[0]
        sys.stdout.write(prompt)
        sys.stdout.flush()
        for piece in stream_text(model, tok, prompt, max_new, stop=args.stop, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    texts = generate_text(model, tok, args.prompts, max_new, stop=args.stop, **sampling)
    for i, (prompt, text) in enumerate(zip(args.prompts, texts)):
        if i:
            print("-" * 40)
        print(prompt + text)
    return 0
