"""``blackmamba bench --serve``: a load generator against a running ``Engine`` (the server's, without HTTP).

Every number is a ratio to a baseline measured in the same run:

- 16 concurrent greedy requests of 48 new tokens vs the same 16 sent one after another (tokens/s; target ≥ 3),
  and whether their texts are identical (batch invariance);
- closed-loop clients at concurrency 1, 4, 16 and 64 (each client sends its next request when the last one
  ends; the clients are tasks of one event loop, as the server's requests are): throughput, time to first token and inter-token latency (median; 90th percentile in the notes),
  each relative to concurrency 1;
- a prompt that extends a cached 1,000-token prefix (sent before, as the previous turn of a chat) vs a prompt
  of the same length whose prefix is new: time to first token (target ≤ 0.5).

The model is ``model`` (a run folder, model folder or hub id) or, by default, the ``small`` preset (the one
``blackmamba train`` trains) with random weights and a byte-level BPE trained on a generated text: the work
per token is that of the trained model, and ``ignore_eos`` keeps every request at its full length.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Callable

import torch

from .harness import row

WORDS = ("the king queen lord love death night day sword crown blood heart heaven fair sweet good my thy thou art "
         "shall will not is and of to what noble gentle father mother speak come go hence").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _default_model(device: str):
    from ..config import preset
    from ..data.tokenizer import train_bpe
    from ..model import BlackMambaLM

    rng = random.Random(0)
    tok = train_bpe([_text(rng, 20000)], 4096)
    torch.manual_seed(0)
    return BlackMambaLM(preset("small")).to(device).eval(), tok


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _timed(engine, prompt: list[int], params) -> tuple[str, float, list[float], int]:
    """(text, time to first token, inter-token gaps, tokens) of one request."""
    t0 = time.perf_counter()
    req = engine.submit(prompt, params, loop=asyncio.get_running_loop())
    text, stamps = [], []
    async for d in req:
        stamps.append(time.perf_counter())
        text.append(d.text)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return "".join(text), stamps[0] - t0, gaps, len(stamps)


def _load(engine, prompts: list[list[int]], params, concurrency: int) -> dict:
    """``concurrency`` clients sending ``prompts`` (each the next one left) back to back: tasks of one event
    loop, as the HTTP server's requests are."""
    async def main():
        left = iter(range(len(prompts)))
        results: list = [None] * len(prompts)

        async def client():
            for i in left:
                results[i] = await _timed(engine, prompts[i], params)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return results, time.perf_counter() - t0

    results, wall = asyncio.run(main())
    tokens = sum(r[3] for r in results)
    return {"texts": [r[0] for r in results], "tokens_per_s": tokens / wall, "ttft": [r[1] for r in results],
            "itl": [g for r in results for g in r[2]]}


def _one(engine, prompt: list[int], params) -> float:
    """Time to first token of one request alone."""
    return asyncio.run(_timed(engine, prompt, params))[1]


def run_serve_bench(model_spec: str | None = None, device: str = "cpu", quick: bool = False,
                    log: Callable[[str], None] = print) -> dict:
    from ..serve import Engine, SamplingParams

    if model_spec is None:
        model, tok = _default_model(device)
        name = "small preset (random weights)"
    else:
        from ..generation import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(model_spec, device=device)
        name = model_spec
    rng = random.Random(1)
    new_tokens = 8 if quick else 48
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    rows: list = []
    notes = [f"model: {name}, {model.num_parameters():,} parameters; {new_tokens} new tokens per request"]
    # no prefix cache here: the concurrent run must prefill what the sequential one prefilled
    with Engine(model, tok, max_batch=16, prefix_cache_mb=0) as engine:
        prompts = [tok.encode(_text(rng, 20)) for _ in range(16)]
        _load(engine, prompts[:4], greedy, 4)  # warm-up: kernels compiled, caches filled
        log("... 16 requests, one after another and all at once")
        sequential = _load(engine, prompts, greedy, 1)
        concurrent = _load(engine, prompts, greedy, 16)
        identical = concurrent["texts"] == sequential["texts"]
        ratio = concurrent["tokens_per_s"] / sequential["tokens_per_s"]
        row(rows, "serve: 16 concurrent greedy requests, tokens/s", concurrent["tokens_per_s"], "tok/s",
            "the same 16 one after another", ratio, ("min", 3.0), quick)
        notes.append(f"16 concurrent texts identical to the sequential ones: {identical}")

        log("... concurrency 1, 4, 16, 64")
        base = None
        for c in (1, 4, 16, 64):
            count = max(8 if quick else 16, 2 * c)
            r = _load(engine, [tok.encode(_text(rng, 20)) for _ in range(count)], greedy, c)
            ttft, itl = statistics.median(r["ttft"]), statistics.median(r["itl"]) if r["itl"] else float("nan")
            if base is None:
                base = (r["tokens_per_s"], ttft, itl)
            row(rows, f"serve: concurrency {c}, throughput", r["tokens_per_s"], "tok/s", "concurrency 1",
                r["tokens_per_s"] / base[0])
            row(rows, f"serve: concurrency {c}, time to first token (median)", ttft * 1e3, "ms", "concurrency 1",
                ttft / base[1])
            row(rows, f"serve: concurrency {c}, inter-token latency (median)", itl * 1e3, "ms", "concurrency 1",
                itl / base[2])
            notes.append(f"concurrency {c}: {count} requests, TTFT p90 {_percentile(r['ttft'], 0.9) * 1e3:.1f} ms, "
                         f"inter-token p90 {_percentile(r['itl'], 0.9) * 1e3:.2f} ms")

    with Engine(model, tok, max_batch=16) as engine:
        log("... a prompt extending a cached 1,000-token prefix vs a new one")
        prefix_len = 200 if quick else 1000
        one = SamplingParams(max_tokens=1, temperature=0)
        ratios, cached_ms, uncached_ms = [], [], []

        def prefix():
            ids = []
            while len(ids) < prefix_len:
                ids += tok.encode(" " + _text(rng, 50))
            return ids[:prefix_len]

        for _ in range(3 if quick else 7):
            turn1, fresh = prefix(), prefix()
            tail = tok.encode(" " + _text(rng, 12))
            _one(engine, turn1, one)  # the previous turn: its end is cached
            cached = _one(engine, turn1 + tail, one)
            uncached = _one(engine, fresh + tail, one)
            ratios.append(cached / uncached)
            cached_ms.append(cached * 1e3)
            uncached_ms.append(uncached * 1e3)
        spread = statistics.quantiles(ratios, n=4, method="inclusive")
        row(rows, f"serve: TTFT, prompt extending a cached {prefix_len}-token prefix", statistics.median(cached_ms),
            "ms", f"a new prefix ({statistics.median(uncached_ms):.1f} ms)", statistics.median(ratios),
            ("max", 0.5), quick, spread=(spread[0], spread[2]))
    return {"device": device, "quick": quick, "torch": torch.__version__, "rows": rows, "notes": notes,
            "identical_texts": identical}
