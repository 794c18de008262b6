"""``Engine``: continuous batching of generation requests over ``model.forward`` (prefill) and ``model.step``
(decode), with a prefix-state cache. ``blackmamba serve`` wraps it; it works without HTTP too:

    engine = Engine(model, tokenizer, max_batch=16)
    for delta in engine.stream("ROMEO.", SamplingParams(max_tokens=48, temperature=0)):
        print(delta.text, end="")              # Delta(index, text, tokens, logprobs, finish_reason)
    req = engine.submit(token_ids, params)     # token ids in; ``async for delta in req`` with loop=...
    results = engine.generate(["ROMEO.", "JULIET."], SamplingParams(max_tokens=20))   # offline, many prompts
    engine.close()

One worker thread runs the model. Each iteration is a token boundary, where requests join and leave:

1. waiting requests are admitted while their sequences (``n`` per request) fit in ``max_batch``;
2. the oldest request still prefilling gets one chunk of its prompt: up to the next multiple of ``block``
   tokens (or its end), starting from the longest prefix the ``PrefixCache`` holds — so a long prompt is spread
   over iterations and running streams keep flowing;
3. every decoding sequence takes one ``model.step``, in groups of at most ``group_rows`` rows, each group's
   state a ``State`` of exactly its sequences (joined with ``State.cat``, left with ``State.select``);
4. each sequence samples its next token with its own options and random stream; finished, stopped and
   cancelled sequences leave at once.

Batch invariance: nothing a request computes depends on the other requests. Its prompt is prefilled alone, in
chunks whose ends are fixed by its own length and ``block``; its decode rows go through kernels that compute
every row the same way whatever the group (the CPU decode kernels take up to ``MAX_ROWS`` = 8 rows, so groups
are at most that big); its random stream is its own (``seed``: the stream ``generate`` gives a prompt with that
seed). So its logits are bit-identical to its own alone, a greedy request gives the text ``blackmamba generate
--greedy`` gives, and a seeded one the same text alone or among others. (Resuming from a cached prompt end can
move a chunk boundary: the logits may then differ from a cold prefill's in the last bits; docs/serving.md.)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..generation.sampling import check_options, greedy, process_logits, row_generators
from ..generation.text import TextStream, encode_prompt
from ..ops.cpu.build import MAX_ROWS
from ..state import State
from .prefix_cache import PrefixCache

log = logging.getLogger("blackmamba")

MAX_LOGPROBS = 20  # the most alternatives a token's logprobs list (OpenAI's limit)


class Overloaded(RuntimeError):
    """The waiting queue is full (the server answers 503): try again later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks for. ``temperature`` 0 is greedy (as in the OpenAI API); the other options are those
    of ``blackmamba.generation`` and are checked by its ``check_options``. ``logprobs``: also return the
    log-probability of each token (under the model's distribution, before temperature and filtering) and of the
    ``logprobs`` most likely alternatives. ``prompt_logprobs``: those of the prompt's tokens too."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: bool = False
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)

    @property
    def do_sample(self) -> bool:
        return self.temperature != 0

    def processing(self) -> tuple:
        """The options that shape the scores: sequences sharing them are processed together."""
        return (self.do_sample, self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)

    def check(self) -> None:
        """``OptionError`` (a ValueError) naming every invalid option."""
        from ..generation.sampling import OptionError

        problems = []
        try:
            check_options(max_new_tokens=self.max_tokens, do_sample=self.do_sample, temperature=self.temperature,
                          top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                          repetition_penalty=self.repetition_penalty, seed=self.seed)
        except OptionError as e:
            problems += [("max_tokens" if name == "max_new_tokens" else name, why) for name, why in e.problems]
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) or not (
                self.temperature >= 0):
            problems.append(("temperature", f"= {self.temperature!r}: must be a number >= 0 (0: greedy)"))
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            problems.append(("n", f"= {self.n!r}: must be an integer >= 1"))
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            problems.append(("logprobs", f"= {self.logprobs!r}: must be an integer in [0, {MAX_LOGPROBS}]"))
        if not all(isinstance(s, str) for s in self.stop):
            problems.append(("stop", "must be text (a string or a list of strings)"))
        if problems:
            raise OptionError(list(dict(problems).items()))


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at that position, most likely first


@dataclass
class Delta:
    """What one choice produced at a token boundary: the text that became final, the new token ids, their
    logprobs (when asked for), and on its last delta why it ended ("stop": EOS or a stop string; "length":
    max_tokens). An EOS token is counted in ``Request.completion_tokens`` but is neither in ``tokens`` nor in
    ``logprobs``: it is not part of the output."""

    index: int
    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


_END = object()


class _Outbox:
    """Items for consumers on event loops, sent once per engine iteration: a ``call_soon_threadsafe`` wakes the
    loop through a pipe, which costs tens of microseconds — per token and request, a large part of a step."""

    def __init__(self):
        self.pending: dict[asyncio.AbstractEventLoop, list] = {}

    def append(self, req, item) -> None:
        self.pending.setdefault(req._loop, []).append((req, item))

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumer's event loop is gone: nobody is listening
                for req, _ in items:
                    req.cancelled = True


def _deliver(items) -> None:  # on the consumer's event loop
    for req, item in items:
        req._queue.put_nowait(item)


class Request:
    """A submitted prompt: iterate it (``for delta in req`` or ``async for``) for its ``Delta``s until every
    choice has finished; ``cancel()`` frees its rows at the next token boundary. After the end:
    ``prompt_tokens``, ``cached_tokens`` (prefilled from the prefix cache), ``completion_tokens`` per choice,
    ``prompt_logprobs`` (when asked for: None for the first token)."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop | None,
                 outbox: _Outbox):
        self.id = next(self._ids)
        self.prompt = prompt
        self.params = params
        self.submitted = time.perf_counter()
        self.cached_tokens = 0
        self.completion_tokens = [0] * params.n
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.open = params.n  # choices still going
        self.cancelled = False
        self.error: BaseException | None = None
        self._loop = loop
        self._outbox = outbox
        self._queue = asyncio.Queue() if loop is not None else queue.Queue()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    def _put(self, item) -> None:
        """Hand ``item`` to the consumer: at once to a thread's queue; to an event loop's, through ``_Outbox`` (one
        wake-up of the loop per iteration, not one per token)."""
        if self._loop is None:
            self._queue.put(item)
        else:
            self._outbox.append(self, item)

    def cancel(self) -> None:
        self.cancelled = True

    def _unwrap(self, item):
        if item is _END:
            if self.error is not None:
                raise RuntimeError(f"generation failed: {self.error}") from self.error
            raise StopIteration
        return item

    def __iter__(self):
        return self

    def __next__(self) -> Delta:
        return self._unwrap(self._queue.get())

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        try:
            return self._unwrap(await self._queue.get())
        except StopIteration:
            raise StopAsyncIteration from None


@dataclass(eq=False)  # compared by identity
class _Choice:
    """One sequence being decoded: a choice of a request."""

    req: Request
    index: int
    generator: torch.Generator | None
    text: TextStream
    seen: torch.Tensor | None  # (V,) bool: tokens present, for the repetition penalty
    last: int = 0  # the token the next step consumes
    stamp: float = 0.0  # when the last token was emitted


@dataclass(eq=False)  # compared by identity
class _Prefill:
    req: Request
    state: State
    pos: int = 0  # prompt tokens consumed
    last_logits: torch.Tensor | None = None  # (V,) after the previous chunk: the next token's distribution


@dataclass(eq=False)  # compared by identity
class _Group:
    """Decoding sequences stepped together: ``state`` has exactly one row per choice, in order."""

    state: State
    choices: list[_Choice] = field(default_factory=list)


class Engine:
    """Continuous batching over one model (see the module docstring). ``max_batch``: sequences running at once
    (prefilling or decoding); ``max_queue``: requests waiting beyond them before ``submit`` raises
    ``Overloaded``; ``max_context``: the most prompt + new tokens a request may ask for; ``block``: prefill chunk
    and snapshot interval; ``prefix_cache_mb``: the prefix cache's budget (0: none); ``metrics``: an object
    with the hooks of ``serve.metrics.Metrics`` (or None)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 256, max_context: int = 16384,
                 block: int = 256, prefix_cache_mb: float = 512, group_rows: int = MAX_ROWS, metrics=None):
        self.check_settings(max_batch=max_batch, max_queue=max_queue, max_context=max_context, block=block,
                            prefix_cache_mb=prefix_cache_mb, group_rows=group_rows)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue, self.max_context = max_batch, max_queue, max_context
        self.block, self.group_rows = block, group_rows
        self.cache = PrefixCache(int(prefix_cache_mb * 2**20), block) if prefix_cache_mb > 0 else None
        self.metrics = metrics
        self.vocab = model.config.vocab_size
        self.eos = tokenizer.eos_id
        self.step = model.bind_step()  # the weights each step reads, bound once: they do not change

        self.live: dict[int, Request] = {}  # taken from the inbox and not ended yet, by id
        self._running = 0
        self.waiting: deque[Request] = deque()
        self.prefilling: list[_Prefill] = []
        self.groups: list[_Group] = []
        self._inbox: list[Request] = []
        self.outbox = _Outbox()  # deltas for event loops, sent at the end of each iteration
        self._cv = threading.Condition()
        self._closing = False
        self._drain = True
        self._thread = threading.Thread(target=self._run, name="blackmamba-engine", daemon=True)
        self._thread.start()

    @staticmethod
    def check_settings(**settings) -> None:
        """``OptionError`` naming every setting out of range (the serve command checks its flags with it before
        loading the model)."""
        from ..generation.sampling import OptionError

        lowest = {"max_batch": 1, "max_queue": 0, "max_context": 2, "block": 1, "group_rows": 1}
        problems = []
        for name, value in settings.items():
            if name == "prefix_cache_mb":
                if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")):
                    problems.append((name, f"= {value!r}: must be a number >= 0 (0: no cache)"))
            elif not isinstance(value, int) or isinstance(value, bool) or value < lowest[name]:
                problems.append((name, f"= {value!r}: must be an integer >= {lowest[name]}"))
        if problems:
            raise OptionError(problems)

    # ------------------------------------------------------------------ public
    @property
    def running(self) -> int:
        """Sequences admitted and not finished: prefilling or decoding (a counter the engine thread keeps, so that
        other threads read it whole, even while a sequence moves from prefill to its decode group)."""
        return self._running

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """``OptionError`` (a ValueError) naming the option or the prompt that makes the request impossible."""
        from ..generation.sampling import OptionError

        params.check()
        V = self.vocab  # the tokenizer's ids: the padded embedding rows beyond them are no tokens
        bad = [t for t in prompt if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < V]
        if len(prompt) == 0:
            raise OptionError([("prompt", "is empty: give at least one token")])
        if bad:
            raise OptionError([("prompt", f"has token id {bad[0]!r}, out of range: the model's vocabulary has ids "
                                          f"0..{V - 1}")])
        if params.n > self.max_batch:
            raise OptionError([("n", f"= {params.n}: more than this server runs at once (max batch "
                                     f"{self.max_batch})")])
        if len(prompt) + params.max_tokens > self.max_context:
            raise OptionError([("max_tokens", f"= {params.max_tokens}: with the prompt's {len(prompt)} tokens, more "
                                              f"than the {self.max_context} tokens this server allows")])

    def submit(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(),
               loop: asyncio.AbstractEventLoop | None = None) -> Request:
        """Queue a prompt (token ids); its ``Request`` yields the deltas (to ``async for`` when ``loop`` is the
        caller's event loop). ValueError for an impossible request, ``Overloaded`` when the queue is full,
        ``EngineClosed`` after ``close``."""
        prompt = list(prompt)
        self.check(prompt, params)
        prompt = [int(t) for t in prompt]
        req = Request(prompt, params, loop, self.outbox)
        with self._cv:
            if self._closing:
                raise EngineClosed("the engine is shutting down")
            if len(self.waiting) + len(self._inbox) >= self.max_queue + max(0, self.max_batch - self.running):
                raise Overloaded(f"{self.max_queue} requests are already waiting")
            self._inbox.append(req)
            self._cv.notify()
        if self.metrics is not None:
            self.metrics.submitted(len(self.waiting) + len(self._inbox))
        return req

    def stream(self, prompt: str, params: SamplingParams = SamplingParams()) -> Request:
        """Submit a text prompt; iterate the returned ``Request`` for its deltas as they come."""
        return self.submit(encode_prompt(self.tokenizer, prompt), params)

    def generate(self, prompts: Sequence[str], params: SamplingParams = SamplingParams()) -> list[list[str]]:
        """Offline: every prompt (text) through the engine at once; for each prompt its ``n`` completions."""
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        for ids in encoded:
            self.check(ids, params)
        results = []
        for ids in encoded:
            while True:
                try:
                    req = self.submit(ids, params)
                    break
                except Overloaded:  # a full queue: let the running requests move on
                    time.sleep(0.01)
            results.append(req)
        out = []
        for req in results:
            texts = [""] * params.n
            for delta in req:
                texts[delta.index] += delta.text
            out.append(texts)
        return out

    def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Take no new requests; finish the running and waiting ones (or cancel them) and stop the thread."""
        with self._cv:
            self._closing = True
            self._drain = not cancel
            self._cv.notify()
        self._thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the worker thread
    def _busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.groups)

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._cv:
                    while not (self._inbox or self._busy() or self._closing):
                        self._cv.wait()
                    for req in self._inbox:
                        self.live[req.id] = req
                    self.waiting.extend(self._inbox)
                    self._inbox.clear()
                    if self._closing and not self._drain:
                        for req in self.live.values():
                            req.cancel()
                    if self._closing and not self._busy():
                        return
                try:
                    self._iteration()
                except Exception as e:  # a defect: end every request with the error, keep the engine alive
                    log.exception("blackmamba serve: engine iteration failed")
                    self.waiting.clear()
                    self.prefilling.clear()
                    self.groups.clear()
                    self._running = 0
                    for req in list(self.live.values()):  # wherever it was: mid-prefill, between lists
                        req.error = e
                        self._end(req)
                finally:
                    self.outbox.flush()

    def _end(self, req: Request) -> None:
        """The request's last message (once)."""
        if self.live.pop(req.id, None) is not None:
            req._put(_END)

    def _iteration(self) -> None:
        self._drop_cancelled()
        while self.waiting and self.running + self.waiting[0].params.n <= self.max_batch:
            self._admit(self.waiting.popleft())
        if self.prefilling:
            self._prefill_chunk(self.prefilling[0])
        if self.groups:
            self._decode()
        if self.metrics is not None:
            self.metrics.batch(len(self.waiting) + len(self._inbox), self.running)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._end(req)
        for p in [p for p in self.prefilling if p.req.cancelled]:
            self.prefilling.remove(p)
            self._running -= p.req.open
            self._end(p.req)
        for g in list(self.groups):  # _leave may remove a group
            gone = [c for c in g.choices if c.req.cancelled]
            if gone:
                self._leave(g, gone)
                for c in gone:
                    self._choice_done(c)

    def _admit(self, req: Request) -> None:
        self._running += req.params.n
        n, state, logits = 0, None, None
        if self.cache is not None and not req.params.prompt_logprobs:
            n, state, logits = self.cache.lookup(req.prompt)
            if self.metrics is not None:
                self.metrics.prefix_lookup(n)
        req.cached_tokens = n
        if self.metrics is not None:
            self.metrics.admitted(len(req.prompt), len(req.prompt) - n)
        if req.params.prompt_logprobs:
            req.prompt_logprobs = [None]
        p = _Prefill(req, state if state is not None else self.model.new_state(1), pos=n, last_logits=logits)
        if n == len(req.prompt):  # the same prompt again: its state and logits are stored, nothing to prefill
            self._start_decoding(p)
        else:
            self.prefilling.append(p)

    def _prefill_chunk(self, p: _Prefill) -> None:
        req = p.req
        L = len(req.prompt)
        end = min(L, (p.pos // self.block + 1) * self.block)
        ids = torch.tensor([req.prompt[p.pos:end]], device=self.model.device)
        keep = 0 if req.params.prompt_logprobs else 1
        logits = self.model(ids, state=p.state, logits_to_keep=keep).logits[0]  # (c, V), or (1, V)
        if req.params.prompt_logprobs:
            before = logits[:-1] if p.last_logits is None else torch.cat([p.last_logits[None], logits[:-1]])
            req.prompt_logprobs += self._logprobs(before, req.prompt[max(p.pos, 1):end], req.params.logprobs or 0)
        p.pos, p.last_logits = end, logits[-1]
        if self.cache is not None and (end % self.block == 0 or end == L):
            # a prompt's end keeps its logits for the same prompt again — unless they came from the whole chunk's
            # head (prompt logprobs), a matmul whose last row need not have the bits of the one-row head's
            ends = p.last_logits if end == L and not req.params.prompt_logprobs else None
            self.cache.store(req.prompt[:end], p.state, ends)
        if end == L:
            self.prefilling.remove(p)
            self._start_decoding(p)

    def _start_decoding(self, p: _Prefill) -> None:
        """The prompt is in: every choice samples its first token from the prompt's last logits and joins a
        decode group (the state forked, one row per choice)."""
        req, prm = p.req, p.req.params
        gens = row_generators(prm.seed, prm.n, self.model.device) if prm.do_sample else [None] * prm.n
        choices = []
        for i, g in enumerate(gens):
            seen = None
            if prm.repetition_penalty != 1.0:
                seen = torch.zeros(self.model.config.padded_vocab_size, dtype=torch.bool, device=self.model.device)
                seen[torch.tensor(req.prompt, device=seen.device)] = True
            choices.append(_Choice(req, i, g, TextStream(self.tokenizer, prm.stop), seen))
        if prm.max_tokens == 0:
            for c in choices:
                req._put(Delta(c.index, "", [], [] if prm.logprobs is not None else None, "length"))
                self._choice_done(c)
            return
        alive = self._emit(choices, p.last_logits[None].expand(len(choices), -1))
        if self.metrics is not None:
            self.metrics.first_token(time.perf_counter() - req.submitted)
        for c in alive:
            self._join(c, p.state if prm.n == 1 else p.state.select([0]))

    def _join(self, c: _Choice, row: State) -> None:
        for g in self.groups:
            if len(g.choices) < self.group_rows:
                g.state = State.cat([g.state, row])
                g.choices.append(c)
                return
        self.groups.append(_Group(row, [c]))

    def _leave(self, g: _Group, gone: list[_Choice]) -> None:
        keep = [i for i, c in enumerate(g.choices) if c not in gone]
        if not keep:
            self.groups.remove(g)
            return
        g.state = g.state.select(keep)
        g.choices = [g.choices[i] for i in keep]

    def _decode(self) -> None:
        logits = []
        for g in self.groups:
            tokens = torch.tensor([c.last for c in g.choices], device=self.model.device)
            logits.append(self.step(tokens, g.state))  # (rows, V)
        choices = [c for g in self.groups for c in g.choices]
        alive = set(map(id, self._emit(choices, torch.cat(logits))))
        for g in list(self.groups):
            gone = [c for c in g.choices if id(c) not in alive]
            if gone:
                self._leave(g, gone)

    # ------------------------------------------------------------------ sampling and output
    def _logprobs(self, logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
        """Each token's log-probability under the model (the real vocabulary's log-softmax) and the ``top`` most
        likely alternatives."""
        if not tokens:
            return []
        lp = torch.log_softmax(logits[:, :self.vocab].float(), dim=-1)
        chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
        alts = torch.topk(lp, top, dim=-1) if top else None
        out = []
        for i, t in enumerate(tokens):
            pairs = list(zip(alts.indices[i].tolist(), alts.values[i].tolist())) if alts is not None else []
            out.append(TokenLogprob(t, chosen[i], pairs))
        return out

    def _sample(self, choices: list[_Choice], logits: torch.Tensor) -> list[int]:
        """Each choice's next token: scores processed together for choices sharing their options (each row's
        result is its own), then argmax or a draw from the choice's own random stream."""
        out = [0] * len(choices)
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(choices):
            groups.setdefault(c.req.params.processing(), []).append(i)
        for rows in groups.values():
            prm = choices[rows[0]].req.params
            sub = logits[rows] if len(rows) < len(choices) else logits
            seen = torch.stack([choices[i].seen for i in rows]) if prm.repetition_penalty != 1.0 else None
            scores = process_logits(sub, vocab_size=self.vocab, do_sample=prm.do_sample,
                                    temperature=prm.temperature, top_k=prm.top_k, top_p=prm.top_p, min_p=prm.min_p,
                                    repetition_penalty=prm.repetition_penalty, seen=seen)
            if prm.do_sample:
                probs = torch.softmax(scores, dim=-1)
                for j, i in enumerate(rows):
                    out[i] = int(torch.multinomial(probs[j], 1, generator=choices[i].generator))
            else:
                for i, t in zip(rows, greedy(scores).tolist()):
                    out[i] = t
        return out

    def _emit(self, choices: list[_Choice], logits: torch.Tensor) -> list[_Choice]:
        """Sample, send each choice its delta; the choices still going."""
        tokens = self._sample(choices, logits)
        asked = [i for i, c in enumerate(choices) if c.req.params.logprobs is not None]
        lp = dict(zip(asked, self._logprobs(logits[asked], [tokens[i] for i in asked],
                                            max(choices[i].req.params.logprobs for i in asked)))) if asked else {}
        now = time.perf_counter()
        alive = []
        for i, (c, t) in enumerate(zip(choices, tokens)):
            prm = c.req.params
            lps = None
            if i in lp:
                lps = [TokenLogprob(t, lp[i].logprob, lp[i].top[:prm.logprobs])]
            c.req.completion_tokens[c.index] += 1
            generated = c.req.completion_tokens[c.index]
            if self.metrics is not None:
                self.metrics.token(now - c.stamp if generated > 1 else None)
            c.stamp = now
            if t == self.eos and not prm.ignore_eos:  # counted, but neither text nor logprobs: not in the output
                c.req._put(Delta(c.index, c.text.finish(), [], [] if lps is not None else None, "stop"))
                self._choice_done(c)
                continue
            piece = c.text.push(t)
            if c.seen is not None:
                c.seen[t] = True
            if c.text.stopped:
                reason = "stop"
            elif generated >= prm.max_tokens:
                reason = "length"
                piece += c.text.finish()
            else:
                reason = None
            c.req._put(Delta(c.index, piece, [t], lps, reason))
            if reason is None:
                c.last = t
                alive.append(c)
            else:
                self._choice_done(c)
        return alive

    def _choice_done(self, c: _Choice) -> None:
        """Count a finished choice; the request ends with its last choice."""
        req = c.req
        req.open -= 1
        self._running -= 1
        if req.open == 0:
            self._end(req)
