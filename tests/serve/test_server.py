"""``blackmamba serve`` as a real process on 127.0.0.1, talked to with the official ``openai`` client and httpx:
completions, chat, streaming, batch invariance, the prefix cache, every bad request (400, nothing else changes),
auth, overload (503), dropped streams and SIGTERM. Every request is bounded in time."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time

import httpx
import openai
import pytest
from support.serving import Server, small_model_and_tokenizer, write_model_folder

from blackmamba.generation import generate_text, stream_text
from blackmamba.serve.chat import ChatTemplate

PROMPTS = ["ROMEO.\nWhat", "K", "JULIET.\nO gentle father, speak: the night is", "Thou", "KING.\nCome", "NURSE."]
TIMEOUT = 30


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def model_tok():
    return small_model_and_tokenizer()


@pytest.fixture(scope="module")
def server(folder):
    srv = Server(folder, "--max-batch", "8")
    yield srv
    srv.proc.send_signal(signal.SIGINT)  # Ctrl-C: as graceful as SIGTERM (tested with a running request below)
    code, out = srv.stop()
    assert code == 0 and "stopped" in out, out


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", timeout=TIMEOUT, max_retries=0)


def metric(server, name: str) -> float:
    text = httpx.get(server.base + "/metrics", timeout=TIMEOUT).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_completion_equals_generate_and_reports_usage(client, model_tok):
    model, tok = model_tok
    r = client.completions.create(model="m", prompt=PROMPTS[2], max_tokens=20, temperature=0)
    assert r.object == "text_completion" and r.model == "m"
    assert r.choices[0].text == "".join(stream_text(model, tok, PROMPTS[2], 20, do_sample=False))
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(tok.encode(PROMPTS[2]))
    assert r.usage.completion_tokens == 20 or r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_concurrent_requests_equal_each_alone(client, model_tok):
    """16 greedy and 16 seeded requests at once through HTTP: each text is what it is alone."""
    model, tok = model_tok
    prompts = PROMPTS * 2 + PROMPTS[:4]

    def ask(p, **kw):
        return client.completions.create(model="m", prompt=p, max_tokens=16, **kw).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        greedy = list(pool.map(lambda p: ask(p, temperature=0), prompts))
        sampled = list(pool.map(lambda p: ask(p, temperature=0.9, seed=3), prompts))
    assert greedy == [generate_text(model, tok, [p], 16)[0] for p in prompts]
    assert sampled == [ask(p, temperature=0.9, seed=3) for p in prompts]
    assert sampled == [generate_text(model, tok, [p], 16, do_sample=True, temperature=0.9, seed=3)[0]
                       for p in prompts]


def test_list_prompt_n_echo_and_logprobs(client, model_tok):
    model, tok = model_tok
    r = client.completions.create(model="m", prompt=PROMPTS[:2], max_tokens=5, temperature=0.8, seed=1, n=2,
                                  logprobs=3, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        prompt = PROMPTS[c.index // 2]
        assert c.text.startswith(prompt)
        lp = c.logprobs
        n_prompt = len(tok.encode(prompt))
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n_prompt + 5
        assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
        assert all(1 <= len(t) <= 3 for t in lp.top_logprobs[1:])  # a dict: tokens that print alike merge
        assert lp.text_offset == sorted(lp.text_offset)
    assert r.choices[0].text != r.choices[1].text  # two choices, two random streams
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in PROMPTS[:2])
    assert r.usage.completion_tokens == 20


def test_streaming_gives_the_same_text_and_usage(client, model_tok):
    model, tok = model_tok
    want = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=24, temperature=0).choices[0].text
    pieces, usage, finish = [], None, None
    for chunk in client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=24, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    assert "".join(pieces) == want and len(pieces) > 5
    assert finish in ("length", "stop") and usage.completion_tokens > 0


def test_chat_with_the_default_template_and_streaming(client, model_tok):
    model, tok = model_tok
    messages = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who goes there?"}]
    prompt = ChatTemplate().render(messages)
    assert prompt == "System: Speak as a king.\n\nUser: Who goes there?\n\nAssistant:"
    want = generate_text(model, tok, [prompt], 20, stop=["\n\nUser:"])[0]
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=20, temperature=0, logprobs=True,
                                       top_logprobs=2)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert 0 < len(r.choices[0].logprobs.content) <= r.usage.completion_tokens  # (an EOS has none)
    assert all(len(e.top_logprobs) == 2 for e in r.choices[0].logprobs.content)
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_multi_turn_chat_resumes_from_the_cached_turn(client):
    turn1 = [{"role": "user", "content": "ROMEO. " * 40}]
    r1 = client.chat.completions.create(model="m", messages=turn1, max_tokens=8, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
    r2 = client.chat.completions.create(model="m", messages=turn2, max_tokens=8, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens  # turn 1's prompt, at least
    again = client.chat.completions.create(model="m", messages=turn2, max_tokens=8, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == r2.usage.prompt_tokens  # the same prompt: no prefill
    assert again.choices[0].message.content == r2.choices[0].message.content


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list()] == ["m"]
    assert httpx.get(server.base + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    text = httpx.get(server.base + "/metrics", timeout=TIMEOUT).text
    for name in ("blackmamba_requests_total", "blackmamba_generation_tokens_total", "blackmamba_queue_depth",
                 "blackmamba_batch_size", "blackmamba_time_to_first_token_seconds_bucket",
                 "blackmamba_inter_token_latency_seconds_bucket", "blackmamba_prefix_cache_hits_total"):
        assert name in text
    assert metric(server, "blackmamba_generation_tokens_total") > 0


def wait_until_idle(srv) -> None:
    deadline = time.monotonic() + TIMEOUT
    while metric(srv, "blackmamba_batch_size") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(srv, "blackmamba_batch_size") == 0


BAD = [
    ("bad json", b"{not json", "application/json", None),
    ("not an object", b"[1, 2]", "application/json", None),
    ("unknown model", {"model": "other", "prompt": "x"}, None, "model"),
    ("missing model", {"prompt": "x"}, None, "model"),
    ("empty prompt", {"model": "m", "prompt": ""}, None, "prompt"),
    ("empty prompt list", {"model": "m", "prompt": []}, None, "prompt"),
    ("negative max_tokens", {"model": "m", "prompt": "x", "max_tokens": -1}, None, "max_tokens"),
    ("huge max_tokens", {"model": "m", "prompt": "x", "max_tokens": 10**9}, None, "max_tokens"),
    ("temperature too high", {"model": "m", "prompt": "x", "temperature": 2.5}, None, "temperature"),
    ("negative temperature", {"model": "m", "prompt": "x", "temperature": -0.1}, None, "temperature"),
    ("top_p zero", {"model": "m", "prompt": "x", "top_p": 0}, None, "top_p"),
    ("top_p above one", {"model": "m", "prompt": "x", "top_p": 1.5}, None, "top_p"),
    ("top_k zero", {"model": "m", "prompt": "x", "top_k": 0}, None, "top_k"),
    ("unknown field", {"model": "m", "prompt": "x", "best_of": 3}, None, "best_of"),
    ("unsupported penalty", {"model": "m", "prompt": "x", "presence_penalty": 0.5}, None, "presence_penalty"),
    ("token id out of range", {"model": "m", "prompt": [10**6]}, None, "prompt"),
    ("padding row, not a token", {"model": "m", "prompt": [303]}, None, "prompt"),
    ("too many logprobs", {"model": "m", "prompt": "x", "logprobs": 50}, None, "logprobs"),
    ("prompt over the limit", {"model": "m", "prompt": "the king " * 20000, "max_tokens": 1}, None, "max_tokens"),
]


@pytest.mark.parametrize("name,body,ctype,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_400_with_an_openai_error_body(server, name, body, ctype, param):
    admitted = metric(server, "blackmamba_prompt_tokens_total")
    if isinstance(body, bytes):
        r = httpx.post(server.url + "/completions", content=body, headers={"content-type": ctype}, timeout=TIMEOUT)
    else:
        r = httpx.post(server.url + "/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    assert metric(server, "blackmamba_prompt_tokens_total") == admitted  # refused before anything ran


def test_bad_chat_requests_and_unknown_paths(server):
    for body in ({"model": "m", "messages": []}, {"model": "m", "messages": [{"role": "wizard", "content": "x"}]},
                 {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}):
        r = httpx.post(server.url + "/chat/completions", json=body, timeout=TIMEOUT)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages"), r.text
    r = httpx.get(server.url + "/nowhere", timeout=TIMEOUT)
    assert r.status_code == 404 and "error" in r.json()
    # nothing changed: the server still answers, with nothing running or waiting
    assert httpx.get(server.base + "/health", timeout=TIMEOUT).status_code == 200
    assert metric(server, "blackmamba_batch_size") == 0 and metric(server, "blackmamba_queue_depth") == 0


def test_auth_overload_dropped_stream_and_sigterm(folder):
    """One slot, no queue, a key: 401 without it; a second request while the slot is busy gets 503; a stream the
    client drops frees the slot; SIGTERM lets a running request finish and the process exit 0."""
    long = 1_000_000  # tokens no machine generates within these tests' timeouts
    srv = Server(folder, "--max-batch", "1", "--max-queue", "0", "--api-key", "sesame", "--shutdown-timeout", "20",
                 "--max-context", str(2 * long))
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=srv.url, api_key="sesame", timeout=TIMEOUT, max_retries=0)
        assert [m.id for m in client.models.list()] == ["m"]
        assert httpx.get(srv.base + "/health", timeout=TIMEOUT).status_code == 200  # no key needed there

        stream = client.completions.create(model="m", prompt="ROMEO.", max_tokens=long, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))  # the slot is taken
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="m", prompt="K", max_tokens=2)
        assert e.value.status_code == 503
        stream.close()  # the client goes away mid-stream
        wait_until_idle(srv)
        assert metric(srv, "blackmamba_generation_tokens_total") < long  # it stopped: the slot was freed
        assert client.completions.create(model="m", prompt="K", max_tokens=2, temperature=0).usage.completion_tokens

        # a client that gives up on a whole (not streamed) response cancels it too
        before = metric(srv, "blackmamba_generation_tokens_total")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/completions", headers={"authorization": "Bearer sesame"}, timeout=1.5,
                       json={"model": "m", "prompt": "ROMEO.", "max_tokens": long, "ignore_eos": True})
        wait_until_idle(srv)
        assert 0 < metric(srv, "blackmamba_generation_tokens_total") - before < long

        with httpx.stream("POST", srv.url + "/completions", headers={"authorization": "Bearer sesame"},
                          json={"model": "m", "prompt": "K", "max_tokens": 300, "temperature": 0, "stream": True},
                          timeout=TIMEOUT) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["index"] == 0
            srv.terminate()  # SIGTERM with a request running: it finishes
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest[:-1]]
        assert finishes[-1] in ("length", "stop")
        code, out = srv.stop(timeout=TIMEOUT)
        assert code == 0, out
        assert "stopped" in out and "Traceback" not in out
        with pytest.raises(httpx.TransportError):
            httpx.get(srv.base + "/health", timeout=2)
    finally:
        srv.stop()


def test_a_failing_engine_answers_500_with_an_error_body_or_an_error_event(model_tok, monkeypatch):
    """In process (the app over an engine whose step fails): a whole response is a 500 with OpenAI's error body,
    a stream ends with an error event that the openai client raises."""
    import asyncio

    from blackmamba.serve import Engine
    from blackmamba.serve.server import create_app

    model, tok = model_tok
    with Engine(model, tok) as engine:
        def failing(*a, **k):
            raise RuntimeError("boom")

        monkeypatch.setattr(engine, "step", failing)
        app = create_app(engine, "m")

        async def ask():
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # (Starlette re-raises, logged)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                whole = await c.post("/v1/completions", json={"model": "m", "prompt": "K", "max_tokens": 5})
                streamed = await c.post("/v1/completions", json={"model": "m", "prompt": "K", "max_tokens": 5,
                                                                 "stream": True})
                return whole, streamed

        whole, streamed = asyncio.run(ask())
    assert whole.status_code == 500 and "boom" in whole.json()["error"]["message"]
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert "boom" in events[-1]["error"]["message"] and "[DONE]" not in streamed.text


def test_a_quantized_server_answers_what_the_quantized_model_generates(folder, model_tok):
    """``serve --quantize int4``: the weights quantized on load, the completions those of the same model
    quantized in this process (greedy, batch invariant)."""
    from blackmamba import load_pretrained

    model, tok = model_tok
    q = load_pretrained(folder, quantize="int4")
    srv = Server(folder, "--quantize", "int4")
    try:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", timeout=TIMEOUT, max_retries=0)
        texts = [client.completions.create(model="m", prompt=p, max_tokens=12, temperature=0).choices[0].text
                 for p in PROMPTS[:3]]
    finally:
        code, out = srv.stop()
    assert code == 0, out
    assert texts == [generate_text(q, tok, [p], 12)[0] for p in PROMPTS[:3]]
    assert texts != [generate_text(model, tok, [p], 12)[0] for p in PROMPTS[:3]]  # (the full-precision model's)
