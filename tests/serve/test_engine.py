"""The engine without HTTP: batch invariance (greedy == ``generate`` alone; a seeded request gives the same text
alone or among others), the prefix cache changes nothing but the work, long prompts are prefilled in chunks while
running streams keep flowing, and cancelled / finished requests free their rows at once."""

import threading
import time

import pytest
import torch
from support.serving import small_model_and_tokenizer

from blackmamba.generation import OptionError, generate_text, stream_text
from blackmamba.serve import Engine, Overloaded, SamplingParams

PROMPTS = ["ROMEO.\nWhat", "K", "JULIET.\nO gentle father, speak: the night is", "Thou", "KING.\nCome", "NURSE.",
           "Good my lord", "the crown"]


@pytest.fixture(scope="module")
def model_tok():
    return small_model_and_tokenizer()


def texts(req):
    out = {}
    for d in req:
        out[d.index] = out.get(d.index, "") + d.text
    return [out[i] for i in sorted(out)]


def test_greedy_equals_generate_alone_whatever_the_batch(model_tok):
    """20 requests, 16 at a time in groups of 8 rows, prompts up to 3 chunks long: every text is what the prompt
    gives alone through ``stream_text`` (the ``generate`` command's path), and every token's logprob is
    bit-identical to that of the same request run alone (no prefix cache: each prefill is computed)."""
    model, tok = model_tok
    prompts = PROMPTS * 2 + PROMPTS[:4]
    prm = SamplingParams(max_tokens=30, temperature=0, logprobs=0)

    def run(engine, ps):
        reqs = [engine.submit(tok.encode(p), prm) for p in ps]
        out = []
        for r in reqs:
            deltas = list(r)
            out.append(("".join(d.text for d in deltas), [(tl.token, tl.logprob) for d in deltas
                                                           for tl in d.logprobs]))
        return out

    with Engine(model, tok, max_batch=16, block=8, prefix_cache_mb=0) as engine:
        crowd = run(engine, prompts)
        alone = {p: run(engine, [p])[0] for p in PROMPTS}
    lengths = [len(tok.encode(p)) for p in PROMPTS]
    assert len(set(lengths)) > 4 and max(lengths) > 3 * 8  # several chunks for the longest
    reference = {p: "".join(stream_text(model, tok, p, 30, do_sample=False)) for p in PROMPTS}
    assert len(set(reference.values())) == len(PROMPTS)  # different prompts, different texts: a real comparison
    assert [text for text, _ in crowd] == [reference[p] for p in prompts]
    assert crowd == [alone[p] for p in prompts]


def test_seeded_request_is_the_same_alone_or_among_others(model_tok):
    model, tok = model_tok
    prm = SamplingParams(max_tokens=25, temperature=1.1, top_p=0.95, top_k=50, min_p=0.01, repetition_penalty=1.1,
                         seed=7, n=2)
    with Engine(model, tok, max_batch=16) as engine:
        crowd = engine.generate(PROMPTS, prm)
        alone = [engine.generate([p], prm)[0] for p in PROMPTS[:3]]
        other_seed = engine.generate(PROMPTS[:1], SamplingParams(**{**prm.__dict__, "seed": 8}))[0]
    assert crowd[:3] == alone
    assert other_seed != crowd[0] and crowd[0][0] != crowd[0][1]  # the seed and the choice index matter
    # choice i draws from the stream ``generate`` gives row i of a batch seeded with the same int
    kw = dict(do_sample=True, temperature=1.1, top_p=0.95, top_k=50, min_p=0.01, repetition_penalty=1.1)
    assert generate_text(model, tok, [PROMPTS[0]] * 2, 25, seed=7, **kw) == crowd[0]


def test_prefix_cache_changes_nothing_but_the_work(model_tok):
    """A long prompt's snapshots (every `block` tokens, and its end) serve later prompts that extend it; texts
    equal those of an engine without a cache, logprobs to float rounding (a snapshot at a prompt's end moves a
    prefill chunk boundary)."""
    model, tok = model_tok
    base = PROMPTS[2] * 12
    turn2 = base + " NURSE.\nAy"
    ids = tok.encode(base)
    assert len(ids) > 3 * 16
    prm = SamplingParams(max_tokens=20, temperature=0, logprobs=0)

    def run(engine, prompt):
        req = engine.submit(prompt, prm)
        deltas = list(req)
        return req, "".join(d.text for d in deltas), [tl.logprob for d in deltas for tl in d.logprobs]

    other = tok.encode(base[:-30] + " KING.")  # shares only some blocks of the first prompt
    assert next(i for i, (a, b) in enumerate(zip(ids, other)) if a != b) >= 16
    with Engine(model, tok, block=16, prefix_cache_mb=0) as plain:
        want = [run(plain, p)[1:] for p in (ids, tok.encode(turn2), other, ids)]
    with Engine(model, tok, block=16) as engine:
        got = []
        for k, prompt in enumerate((ids, tok.encode(turn2), other, ids)):
            req, text, lps = run(engine, prompt)
            got.append((text, lps))
            cached = [0, len(ids), next(i for i, (a, b) in enumerate(zip(ids, other)) if a != b) // 16 * 16,
                      len(ids)][k]
            assert req.cached_tokens == cached  # turn 2 resumes from turn 1's end; the same prompt needs no prefill
        assert engine.cache.hits == 3
    for (text, lps), (want_text, want_lps) in zip(got, want):
        assert text == want_text
        assert lps == pytest.approx(want_lps, abs=1e-5)


def test_long_prompt_is_prefilled_in_chunks_while_a_stream_keeps_flowing(model_tok):
    model, tok = model_tok
    with Engine(model, tok, block=8) as engine:
        running = engine.submit(tok.encode("ROMEO."), SamplingParams(max_tokens=400, temperature=0,
                                                                     ignore_eos=True))
        next(running)
        before = running.completion_tokens[0]
        long_ids = tok.encode(PROMPTS[2] * 6)
        late = engine.submit(long_ids, SamplingParams(max_tokens=1, temperature=0))
        next(late)
        # one chunk of 8 tokens per iteration, one decode step of the running stream in each
        assert running.completion_tokens[0] - before >= len(long_ids) // 8 - 1
        running.cancel()
        list(running)


def test_cancelled_request_frees_its_row_for_a_waiting_one(model_tok):
    model, tok = model_tok
    with Engine(model, tok, max_batch=1, max_queue=1) as engine:
        first = engine.submit(tok.encode("ROMEO."), SamplingParams(max_tokens=10_000, temperature=0,
                                                                   ignore_eos=True))
        next(first)
        second = engine.submit(tok.encode("K"), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        with pytest.raises(Overloaded):
            engine.submit(tok.encode("K"), SamplingParams(max_tokens=5))
        assert second.completion_tokens == [0]
        first.cancel()
        assert len(texts(second)) == 1 and second.completion_tokens == [5]
        assert sum(first.completion_tokens) < 10_000
        deadline = time.monotonic() + 10
        while (engine.running or engine.groups) and time.monotonic() < deadline:  # (the engine thread's lists)
            time.sleep(0.01)
        assert engine.running == 0 and not engine.groups


def test_max_tokens_zero_and_finish_reasons(model_tok):
    model, tok = model_tok
    with Engine(model, tok) as engine:
        deltas = list(engine.submit(tok.encode("ROMEO."), SamplingParams(max_tokens=0)))
        assert [(d.text, d.finish_reason) for d in deltas] == [("", "length")]
        deltas = list(engine.submit(tok.encode("ROMEO."), SamplingParams(max_tokens=7, temperature=0,
                                                                         ignore_eos=True)))
        assert len(deltas) == 7 and deltas[-1].finish_reason == "length"
        full = "".join(d.text for d in deltas)
        stop = full[3:5]
        stopped = list(engine.submit(tok.encode("ROMEO."), SamplingParams(max_tokens=7, temperature=0,
                                                                          stop=(stop,))))
        assert "".join(d.text for d in stopped) == full[:full.index(stop)]
        assert stopped[-1].finish_reason == "stop"


def test_logprobs_are_the_models_log_softmax(model_tok):
    model, tok = model_tok
    ids = tok.encode("ROMEO.\nWhat")
    with Engine(model, tok) as engine:
        deltas = list(engine.submit(ids, SamplingParams(max_tokens=3, temperature=0, logprobs=2,
                                                        prompt_logprobs=True, ignore_eos=True)))
        req = engine.submit(ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True, logprobs=0))
        list(req)
    new = [d.tokens[0] for d in deltas]
    full = torch.tensor([ids + new])
    lp = torch.log_softmax(model(full).logits[0, :, :tok.vocab_size].float(), -1)
    for k, d in enumerate(deltas):
        pos = len(ids) - 1 + k
        tl = d.logprobs[0]
        assert tl.token == new[k] and tl.top[0][0] == new[k]  # greedy: the chosen token is the most likely
        assert tl.logprob == pytest.approx(lp[pos, new[k]].item(), abs=1e-4)
        assert [t for t, _ in tl.top] == lp[pos].topk(2).indices.tolist()
    assert req.prompt_logprobs[0] is None and len(req.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        assert req.prompt_logprobs[pos].logprob == pytest.approx(lp[pos - 1, ids[pos]].item(), abs=1e-4)


def test_impossible_requests_are_refused_before_they_run(model_tok):
    model, tok = model_tok
    with Engine(model, tok, max_batch=4, max_context=50) as engine:
        for prompt, prm, name in [([], SamplingParams(), "prompt"), ([10**6], SamplingParams(), "prompt"),
                                  ([1], SamplingParams(max_tokens=50), "max_tokens"),
                                  ([1], SamplingParams(n=5), "n"), ([1], SamplingParams(top_p=0.0), "top_p"),
                                  ([1], SamplingParams(temperature=-1.0), "temperature"),
                                  ([1], SamplingParams(max_tokens=-1), "max_tokens")]:
            with pytest.raises(OptionError) as e:
                engine.submit(prompt, prm)
            assert e.value.problems[0][0] == name
        assert not engine.waiting and engine.running == 0
    with pytest.raises(OptionError, match="max_batch"):
        Engine(model, tok, max_batch=0)


def test_async_consumers_and_threads_share_one_engine(model_tok):
    """Requests from several threads at once (as the HTTP server's event loop and offline callers would) each get
    their own text."""
    import asyncio

    model, tok = model_tok
    want = {p: "".join(stream_text(model, tok, p, 12, do_sample=False)) for p in PROMPTS}
    got = {}
    with Engine(model, tok) as engine:
        async def one(p):
            req = engine.submit(tok.encode(p), SamplingParams(max_tokens=12, temperature=0),
                                loop=asyncio.get_running_loop())
            return "".join([d.text async for d in req])

        async def all_async():
            return await asyncio.gather(*(one(p) for p in PROMPTS[:4]))

        def worker(p):
            got[p] = engine.generate([p], SamplingParams(max_tokens=12, temperature=0))[0][0]

        threads = [threading.Thread(target=worker, args=(p,)) for p in PROMPTS[4:]]
        for t in threads:
            t.start()
        async_texts = asyncio.run(all_async())
        for t in threads:
            t.join(30)
    assert async_texts == [want[p] for p in PROMPTS[:4]]
    assert got == {p: want[p] for p in PROMPTS[4:]}


def test_a_failing_step_ends_every_request_with_the_error_and_the_engine_serves_on(model_tok, monkeypatch):
    """A defect mid-iteration (here a step that raises) reaches every running request as an error — none is left
    waiting forever, wherever it was — and later requests are served."""
    import concurrent.futures

    model, tok = model_tok
    with Engine(model, tok) as engine:
        calls = {"n": 0}
        real_step = engine.step  # the model's step, bound when the engine started

        def failing(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("boom")
            return real_step(*a, **k)

        monkeypatch.setattr(engine, "step", failing)
        reqs = [engine.submit(tok.encode(p), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
                for p in PROMPTS[:3]]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(list, r) for r in reqs]
            for f in futures:
                with pytest.raises(RuntimeError, match="boom"):
                    f.result(timeout=30)
        assert engine.running == 0 and not engine.live
        assert len(engine.generate(["K"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0][0]) > 0
