"""The OpenAI-compatible HTTP API over an ``Engine``: a FastAPI app (``create_app``) that uvicorn runs
(``blackmamba serve``, docs/serving.md).

    POST /v1/completions        prompt (text, texts, token ids), max_tokens, temperature, top_p, top_k, min_p,
                                repetition_penalty, seed, stop, n, logprobs, echo, stream (+ stream_options)
    POST /v1/chat/completions   messages (the model folder's chat template, else ``chat.py``'s default), the same
                                options (max_tokens or max_completion_tokens; logprobs + top_logprobs)
    GET  /v1/models             the one model served
    GET  /health                200 while serving
    GET  /metrics               Prometheus text (``metrics.py``)

Every error has OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for a request that is
malformed or impossible (bad JSON, a missing or unknown field, an unknown model, an empty prompt, an option out of
range, a prompt + max_tokens over the limit) — checked before anything runs, by the engine's own validation; 401
for a missing or wrong API key; 404 for an unknown path; 503 when the queue is full or the server is shutting
down; 500 when generation fails (in a stream that has started: a last ``data: {"error": ...}`` event instead
of ``[DONE]``). A client that disconnects cancels its request: its rows are freed at the next token boundary.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from functools import lru_cache
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation.text import check_prompt
from .chat import ROLES, ChatTemplate
from .engine import MAX_LOGPROBS, Engine, EngineClosed, Overloaded, SamplingParams
from .metrics import Metrics


# ---------------------------------------------------------------------------------------------- request bodies
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Options(BaseModel):
    """Options both endpoints take. Unknown fields are refused (400 naming them) rather than silently ignored;
    OpenAI's penalties and logit_bias are accepted only at their neutral values."""

    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # a client's end-user id: recorded nowhere
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # not OpenAI's (vLLM's): generate max_tokens whatever the model says, for benchmarks

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _neutral(cls, v):
        if v != 0:
            raise ValueError("is not supported (only 0); use repetition_penalty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("is not supported (only empty)")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("must be at most 4 non-empty strings")
        return stops

    def sampling(self, max_tokens: int, logprobs: int | None, prompt_logprobs: bool = False,
                 stop: tuple[str, ...] = ()) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                              top_p=None if self.top_p == 1 else self.top_p, top_k=self.top_k, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, seed=self.seed,
                              stop=tuple(self.stop or ()) + stop, n=self.n, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, ignore_eos=self.ignore_eos)


class CompletionRequest(_Options):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: not used by the templates here
    role: Literal[ROLES]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts can be served
            if any(p.get("type") != "text" for p in self.content):
                raise ValueError("only text content parts are supported")
            return "".join(str(p.get("text", "")) for p in self.content)
        return self.content or ""


class ChatRequest(_Options):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


# ---------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _invalid(e: ValueError) -> APIError:
    problems = getattr(e, "problems", None)  # an OptionError names its options
    return APIError(400, str(e), param=problems[0][0] if problems else None)


# ---------------------------------------------------------------------------------------------- the app
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _Gate:
    """Plain ASGI middleware: the API key on /v1/ and the request counter. (Starlette's BaseHTTPMiddleware would
    hide a client's disconnect from the endpoints, which then could not cancel what it asked for.)"""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = path if path in ENDPOINTS else "other"  # unknown paths share one series
        if self.expected is not None and path.startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                self.metrics.requests.labels(label, "401").inc()
                response = error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                          "authentication_error", code="invalid_api_key")
                return await response(scope, receive, send)
        status = {}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(label, str(status.get("code", 500))).inc()


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, metrics: Metrics | None = None,
               chat_template: ChatTemplate | None = None) -> FastAPI:
    """The HTTP API over ``engine``, serving it as ``model_name``. The engine is closed (its requests cancelled)
    when the app shuts down."""
    from contextlib import asynccontextmanager

    metrics = metrics or engine.metrics or Metrics()
    engine.metrics = metrics  # the engine feeds the token, latency, batch and cache metrics /metrics shows
    template = chat_template or ChatTemplate()
    tok = engine.tokenizer
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.close, True)  # uvicorn has let the running requests finish (or cut them)

    app = FastAPI(title="blackmamba", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @lru_cache(maxsize=65536)
    def token_text(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False)

    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}".strip())
        param = ".".join(loc) or None
        msg = err.get("msg", "invalid request").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "is not a known field"
        if not loc and err.get("type") in ("model_attributes_type", "dict_type", "missing"):
            return error_response(400, "the body must be a JSON object (Content-Type: application/json)")
        return error_response(400, f"{param}: {msg}" if param else msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                              else "server_error")

    @app.exception_handler(Exception)
    async def _failure(request, exc: Exception):
        return error_response(500, f"the server failed: {exc}", "server_error")

    @app.exception_handler(APIError)
    async def _api(request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, headers)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "blackmamba"}]}

    def check_model(body: _Options) -> None:
        if body.model != model_name:
            raise APIError(400, f"the model {body.model!r} is not served here (this server serves {model_name!r})",
                           param="model", code="model_not_found")

    def encode(text: str, param: str) -> list[int]:
        try:
            check_prompt(text)
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None
        ids = tok.encode(text)
        if not ids:
            raise APIError(400, f"{param} is empty: give some text", param=param)
        return ids

    def submit(prompts: list[list[int]], params: SamplingParams):
        for ids in prompts:  # everything checked before anything runs
            try:
                engine.check(ids, params)
            except ValueError as e:
                raise _invalid(e) from None
        loop = asyncio.get_running_loop()
        reqs = []
        try:
            for ids in prompts:
                reqs.append(engine.submit(ids, params, loop=loop))
        except (Overloaded, EngineClosed) as e:
            for r in reqs:
                r.cancel()
            raise APIError(503, f"the server is overloaded ({e}); retry later" if isinstance(e, Overloaded)
                           else "the server is shutting down", "server_error",
                           code="overloaded" if isinstance(e, Overloaded) else "shutting_down") from None
        return reqs

    def usage(reqs) -> dict:
        prompt = sum(r.prompt_tokens for r in reqs)
        completion = sum(sum(r.completion_tokens) for r in reqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in reqs)}}

    async def merged(reqs, n: int):
        """(choice index over all prompts, delta) as they come, from every request."""
        if len(reqs) == 1:
            async for d in reqs[0]:
                yield d.index, d
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(k, r):
            try:
                async for d in r:
                    await queue.put((k * n + d.index, d))
            except BaseException as e:  # noqa: BLE001  (handed to the consumer)
                await queue.put(e)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(k, r)) for k, r in enumerate(reqs)]
        try:
            left = len(reqs)
            while left:
                item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    async def collect(request: Request, reqs, n: int) -> dict[int, list]:
        """Every choice's deltas; the requests are cancelled if the client goes away meanwhile."""
        out: dict[int, list] = {}

        async def gather():
            async for i, d in merged(reqs, n):
                out.setdefault(i, []).append(d)

        task = asyncio.create_task(gather())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    break
            if task.done() and not task.cancelled():
                task.result()  # a failed generation raises here
            return out
        finally:
            if not task.done():
                task.cancel()
            if not all(r.open == 0 for r in reqs):
                for r in reqs:
                    r.cancel()

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def streaming(gen, reqs) -> StreamingResponse:
        async def body():
            try:
                async for chunk in gen:
                    yield chunk
                yield "data: [DONE]\n\n"
            except Exception as e:  # noqa: BLE001  (the stream has started: the error goes in it, as OpenAI's do)
                yield sse({"error": {"message": f"the server failed: {e}", "type": "server_error", "param": None,
                                     "code": None}})
            finally:  # the client went away (or the stream ended): free whatever still runs
                for r in reqs:
                    r.cancel()
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ completions
    def completion_logprobs(deltas, offset: int, top: int, prompt_part=None) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for tl, piece_start in (prompt_part or []):
            tokens.append(token_text(tl.token) if tl is not None else None)
            lps.append(tl.logprob if tl is not None else None)
            tops.append({token_text(t): lp for t, lp in tl.top} if tl is not None and top else None)
            offsets.append(piece_start)
        for d in deltas:
            for tl in d.logprobs or []:
                tokens.append(token_text(tl.token))
                lps.append(tl.logprob)
                tops.append({token_text(t): lp for t, lp in tl.top} if top else None)
                offsets.append(offset)
            offset += len(d.text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def prompt_logprob_part(req) -> list:
        """(TokenLogprob, or None for the first token; text offset) per prompt token, for echo."""
        part, offset = [], 0
        for t, tl in zip(req.prompt, req.prompt_logprobs):
            part.append((tl, offset))
            offset += len(token_text(t))
        return part

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        p = body.prompt
        if isinstance(p, str):
            texts, prompts = [p], [encode(p, "prompt")]
        elif p and all(isinstance(x, int) for x in p):
            texts, prompts = [None], [list(p)]
        elif p and all(isinstance(x, str) for x in p):
            texts, prompts = list(p), [encode(x, f"prompt[{i}]") for i, x in enumerate(p)]
        elif p and all(isinstance(x, list) for x in p):
            texts, prompts = [None] * len(p), [list(x) for x in p]
        else:
            raise APIError(400, "prompt is empty: give a text, a list of texts or token ids", param="prompt")
        if body.max_tokens is None:
            raise APIError(400, "max_tokens must be an integer >= 0", param="max_tokens")
        if body.echo:
            texts = [t if t is not None else tok.decode(ids) for t, ids in zip(texts, prompts)]
        params = body.sampling(body.max_tokens, body.logprobs, prompt_logprobs=body.echo and body.logprobs is not None)
        reqs = submit(prompts, params)
        rid, n, top = f"cmpl-{uuid.uuid4().hex}", body.n, body.logprobs or 0

        def head(choices):
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": choices}

        if body.stream:
            async def chunks():
                offsets = {}
                if body.echo:
                    for k, text in enumerate(texts):
                        for i in range(n):
                            offsets[k * n + i] = len(text)
                            yield sse(head([{"index": k * n + i, "text": text, "logprobs": None,
                                             "finish_reason": None}]))
                async for i, d in merged(reqs, n):
                    off = offsets.get(i, 0)
                    lp = completion_logprobs([d], off, top) if body.logprobs is not None else None
                    offsets[i] = off + len(d.text)
                    yield sse(head([{"index": i, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}]))
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**head([]), "usage": usage(reqs)})
            return streaming(chunks(), reqs)

        got = await collect(request, reqs, n)
        choices = []
        for k, text in enumerate(texts):
            for i in range(n):
                deltas = got.get(k * n + i, [])
                prefix = text if body.echo else ""
                lp = None
                if body.logprobs is not None:
                    lp = completion_logprobs(deltas, len(prefix), top,
                                             prompt_logprob_part(reqs[k]) if body.echo else None)
                choices.append({"index": k * n + i, "text": prefix + "".join(d.text for d in deltas),
                                "logprobs": lp, "finish_reason": deltas[-1].finish_reason if deltas else None})
        return {**head(choices), "usage": usage(reqs)}

    # ------------------------------------------------------------------ chat
    def chat_logprobs(deltas, top: int) -> dict:
        def entry(t, lp):
            s = token_text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {"content": [{**entry(tl.token, tl.logprob), "top_logprobs": [entry(t, lp) for t, lp in tl.top[:top]]}
                            for d in deltas for tl in (d.logprobs or [])]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            prompt_text = template.render(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = encode(prompt_text, "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = max(0, engine.max_context - len(ids))
        top = body.top_logprobs or 0
        params = body.sampling(max_tokens, top if body.logprobs else None, stop=template.stop)
        reqs = submit([ids], params)
        rid, n = f"chatcmpl-{uuid.uuid4().hex}", body.n

        def head(choices, obj):
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": choices}

        if body.stream:
            async def chunks():
                for i in range(n):
                    yield sse(head([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}], "chat.completion.chunk"))
                async for i, d in merged(reqs, n):
                    delta = {"content": d.text} if d.text or not d.finish_reason else {}
                    yield sse(head([{"index": i, "delta": delta,
                                     "logprobs": chat_logprobs([d], top) if body.logprobs else None,
                                     "finish_reason": d.finish_reason}], "chat.completion.chunk"))
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**head([], "chat.completion.chunk"), "usage": usage(reqs)})
            return streaming(chunks(), reqs)

        got = await collect(request, reqs, n)
        choices = []
        for i in range(n):
            deltas = got.get(i, [])
            choices.append({"index": i, "message": {"role": "assistant", "content": "".join(d.text for d in deltas)},
                            "logprobs": chat_logprobs(deltas, top) if body.logprobs else None,
                            "finish_reason": deltas[-1].finish_reason if deltas else None})
        return {**head(choices, "chat.completion"), "usage": usage(reqs)}

    return app
