"""``blackmamba bench --serve``: a load generator against a serving engine — in this process (``Engine``, what
``blackmamba serve`` wraps), or a running server through its HTTP API (``--url``, with the ``openai`` client).

Every number is a ratio to a baseline measured in the same run:

- 16 concurrent greedy requests of 48 new tokens vs 16 like them sent one after another (tokens/s; target ≥
  3; the median of three alternated pairs, each run with prompts of its own), and whether the first sequential
  run's prompts sent again all at once give identical texts (batch invariance);
- closed-loop clients at concurrency 1, 4, 16 and 64 (each client sends its next request when the last one
  ends; the clients are tasks of one event loop, as the server's requests are): throughput, time to first
  token and inter-token latency (median; 90th percentile in the notes), each relative to concurrency 1;
- a prompt that extends a cached 1,000-token prefix (sent before, as the previous turn of a chat) vs a prompt
  of the same length whose prefix is new: time to first token (target ≤ 0.5).

In process, the model is ``model`` (a run folder, model folder or hub id) or, by default, the ``small`` preset
(the one ``blackmamba train`` trains) with random weights and a byte-level BPE trained on a generated text: the
work per token is that of the trained model. Requests use ``ignore_eos``, so each is as long as asked. The
timed rows run without a prefix cache in process, and against a server with prompts new to it: every request is
prefilled.
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


class _InProcess:
    """Requests to an ``Engine`` in this process; prompts are texts, encoded with its tokenizer."""

    def __init__(self, engine):
        self.engine = engine

    async def aclose(self) -> None:
        pass

    async def send(self, prompt: str, max_tokens: int):
        """(text, time to first token, inter-token gaps, tokens) of one greedy request."""
        from ..serve import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        req = self.engine.submit(self.engine.tokenizer.encode(prompt), params, loop=asyncio.get_running_loop())
        text, stamps = [], []
        async for d in req:
            stamps.append(time.perf_counter())
            text.append(d.text)
        return "".join(text), stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], len(stamps)


class _OverHTTP:
    """Streamed greedy completions from a running server (``openai.AsyncOpenAI``), one chunk per token."""

    def __init__(self, url: str, api_key: str | None):
        self.url, self.api_key = url, api_key or "unused"
        self.model = None
        self._clients: dict = {}  # one per event loop: an async HTTP client belongs to the loop it was made on

    async def aclose(self) -> None:
        """Close this loop's client (before its loop ends)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    async def send(self, prompt: str, max_tokens: int):
        import openai

        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            self._clients[loop] = openai.AsyncOpenAI(base_url=self.url, api_key=self.api_key, max_retries=0,
                                                     timeout=600)
        client = self._clients[loop]
        if self.model is None:
            self.model = (await client.models.list()).data[0].id
        t0 = time.perf_counter()
        stream = await client.completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens,
                                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
        text, stamps = [], []
        async for chunk in stream:
            if chunk.choices:
                stamps.append(time.perf_counter())
                text.append(chunk.choices[0].text)
        return "".join(text), stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], len(stamps)


def _load(target, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    """``concurrency`` clients sending ``prompts`` (each the next one left) back to back."""
    async def main():
        left = iter(range(len(prompts)))
        results: list = [None] * len(prompts)

        async def client():
            for i in left:
                results[i] = await target.send(prompts[i], max_tokens)

        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(client() for _ in range(concurrency)))
        finally:
            await target.aclose()
        return results, time.perf_counter() - t0

    results, wall = asyncio.run(main())
    tokens = sum(r[3] for r in results)
    return {"texts": [r[0] for r in results], "tokens_per_s": tokens / wall, "ttft": [r[1] for r in results],
            "itl": [g for r in results for g in r[2]]}


def _ttft(target, prompt: str) -> float:
    async def main():
        try:
            return (await target.send(prompt, 1))[1]
        finally:
            await target.aclose()
    return asyncio.run(main())


def _batching_rows(target, rng, new_tokens: int, quick: bool, rows: list, notes: list) -> bool:
    _load(target, [_text(rng, 20) for _ in range(4)], new_tokens, 4)  # warm-up: kernels compiled, caches filled
    # alternated pairs (16 one after another, then 16 at once), the ratio their median: the machine's speed drifts
    # between runs. Each timed run has prompts of its own: a server's prefix cache would hand a run an earlier
    # one's prompts without a prefill
    ratios, rates, first = [], [], None
    for _ in range(1 if quick else 3):
        prompts = [_text(rng, 20) for _ in range(16)]
        sequential = _load(target, prompts, new_tokens, 1)
        concurrent = _load(target, [_text(rng, 20) for _ in range(16)], new_tokens, 16)
        ratios.append(concurrent["tokens_per_s"] / sequential["tokens_per_s"])
        rates.append(concurrent["tokens_per_s"])
        first = first or (prompts, sequential["texts"])
    identical = _load(target, first[0], new_tokens, 16)["texts"] == first[1]  # the same prompts at once
    spread = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else None
    row(rows, "serve: 16 concurrent greedy requests, tokens/s", statistics.median(rates), "tok/s",
        "the same 16 one after another", statistics.median(ratios), ("min", 3.0), quick,
        spread=(spread[0], spread[2]) if spread else None)
    notes.append(f"16 concurrent texts identical to the sequential ones: {identical}")
    base = None
    for c in (1, 4, 16, 64):
        count = max(8 if quick else 16, 2 * c)
        r = _load(target, [_text(rng, 20) for _ in range(count)], new_tokens, c)
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
    return identical


def _cache_row(target, rng, prefix: Callable[[], str], label: str, quick: bool, rows: list) -> None:
    ratios, cached_ms, uncached_ms = [], [], []
    for _ in range(3 if quick else 7):
        turn1, fresh, tail = prefix(), prefix(), " " + _text(rng, 12)
        _ttft(target, turn1)  # the previous turn: its end is cached
        cached = _ttft(target, turn1 + tail)
        uncached = _ttft(target, fresh + tail)
        ratios.append(cached / uncached)
        cached_ms.append(cached * 1e3)
        uncached_ms.append(uncached * 1e3)
    spread = statistics.quantiles(ratios, n=4, method="inclusive")
    row(rows, f"serve: TTFT, prompt extending a cached {label} prefix", statistics.median(cached_ms), "ms",
        f"a new prefix ({statistics.median(uncached_ms):.1f} ms)", statistics.median(ratios), ("max", 0.5), quick,
        spread=(spread[0], spread[2]))


def run_serve_bench(model_spec: str | None = None, device: str = "cpu", quick: bool = False, url: str | None = None,
                    api_key: str | None = None, log: Callable[[str], None] = print) -> dict:
    rng = random.Random(1)
    new_tokens = 8 if quick else 48
    prefix_words = 40 if quick else 200  # a prefix of about 1,000 tokens (200 with --quick) for the cache row
    rows: list = []
    if url is not None:
        import openai

        target = _OverHTTP(url, api_key)
        try:
            _ttft(target, "hello")
        except openai.APIError as e:
            raise ValueError(f"--url {url}: no server answers there ({e})") from None
        notes = [f"server: {url}; {new_tokens} new tokens per request"]
        log("... 16 requests, one after another and all at once; concurrency 1, 4, 16, 64")
        identical = _batching_rows(target, rng, new_tokens, quick, rows, notes)
        log("... a prompt extending a cached prefix vs a new one")
        _cache_row(target, rng, lambda: " ".join(_text(rng, 50) for _ in range(prefix_words // 10)),
                   f"{prefix_words * 5}-word", quick, rows)
        return {"device": "server", "url": url, "quick": quick, "rows": rows, "notes": notes,
                "identical_texts": identical}

    from ..serve import Engine

    if model_spec is None:
        model, tok = _default_model(device)
        name = "small preset (random weights)"
    else:
        from ..generation import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(model_spec, device=device)
        name = model_spec
    notes = [f"model: {name}, {model.num_parameters():,} parameters; {new_tokens} new tokens per request"]
    # no prefix cache here: the concurrent run must prefill what the sequential one prefilled
    with Engine(model, tok, max_batch=16, prefix_cache_mb=0) as engine:
        log("... 16 requests, one after another and all at once; concurrency 1, 4, 16, 64")
        identical = _batching_rows(_InProcess(engine), rng, new_tokens, quick, rows, notes)
    with Engine(model, tok, max_batch=16) as engine:
        log("... a prompt extending a cached 1,000-token prefix vs a new one")
        length = 200 if quick else 1000

        def prefix() -> str:  # text of `length` tokens (give or take one: decoding a cut and encoding it again)
            ids = []
            while len(ids) < length:
                ids += tok.encode(" " + _text(rng, 50))
            return tok.decode(ids[:length])

        _cache_row(_InProcess(engine), rng, prefix, f"{length}-token", quick, rows)
    return {"device": device, "quick": quick, "torch": torch.__version__, "rows": rows, "notes": notes,
            "identical_texts": identical}
