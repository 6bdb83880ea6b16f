"""An OpenAI-compatible HTTP server (FastAPI + uvicorn, the `serve` extra): /v1/completions, /v1/models, /health.

One process holds one model instance, driven by runtime.serve.scheduler's single worker thread: requests that
arrive together are batched into shared forward passes, later ones wait in a bounded queue, a full queue
answers 429 at once. A client that disconnects cancels its rows; every request has a deadline
(`request_timeout_s`, queueing included). Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`.

Request fields: `model`, `prompt` (a string, a list of strings, or token ids: a list of ints or a list of
lists), `max_tokens` (default 16), `temperature` (0..2, 0 = greedy), `top_p`, `stop` (a string or up to 4),
`seed`, `n` (1 only), `stream`, `stream_options.include_usage`, `user` (ignored); the common extensions
`top_k` and `repetition_penalty`; and OpenAI fields this server does not implement only at their no-op
values (`echo` false, `logprobs` null, `best_of` 1, `presence_penalty` / `frequency_penalty` 0,
`logit_bias` empty, `suffix` null). Any other field is a 400 naming it.

    nanogpt-deploy serve out/tiny --port 8000        # see runtime/cli/serve.py
    app = create_app(backend, tokenizer, ServerSettings(model_name="tiny"))
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..generation import GenerationError, SamplingParams, check_context
from ..sampling import SamplingError
from .scheduler import Overloaded, Scheduler, WorkerDead


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_batch: int = 16  # rows per batch
    max_queue: int = 64  # requests waiting while a batch runs
    batch_window_ms: float = 10.0  # how long the first request of a batch waits for company
    batching: str = "continuous"  # "continuous": requests join a running batch; "static": they wait for the next
    request_timeout_s: float = 60.0  # arrival -> last token, queueing included
    max_body_bytes: int = 1 << 20

    def __post_init__(self):
        # NaN passes every comparison and inf overflows the worker's waits: both are refused by name
        if not 0 < self.request_timeout_s < math.inf:
            raise ValueError(f"request_timeout_s must be a finite number of seconds > 0, got {self.request_timeout_s}")
        if not 0 <= self.batch_window_ms < math.inf:
            raise ValueError(f"batch_window_ms must be a finite number of ms >= 0, got {self.batch_window_ms}")


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body, status_code=e.status, headers=e.headers)


# OpenAI fields accepted only at the value that makes them a no-op
NOOP_FIELDS = {"echo": (False,), "logprobs": (None, 0), "best_of": (1,), "presence_penalty": (0,),
               "frequency_penalty": (0,), "logit_bias": ({},), "suffix": (None, "")}
KNOWN_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
                "stream_options", "user", "top_k", "repetition_penalty"} | set(NOOP_FIELDS)
API_NAMES = {"max_new_tokens": "max_tokens"}  # SamplingParams field -> request field, where they differ
JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object", list: "array"}


def _field(body: dict, name: str, types: tuple, default=None):
    """body[name] if it has one of `types` (null -> default); a 400 naming the field otherwise."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        want = " or ".join(JSON_TYPES[t] for t in types)
        raise APIError(400, f"{name} must be {'an' if want[0] in 'aeiou' else 'a'} {want}, got "
                            f"{json.dumps(value)[:80]}",
                       param=name, code="invalid_type")
    return value


def _number(body: dict, name: str, default: float) -> float:
    """A numeric field as a float; a 400 naming the field when it is not a number or too large for one."""
    value = _field(body, name, (int, float), default)
    try:
        return float(value)
    except OverflowError:
        raise APIError(400, f"{name} is too large ({str(value)[:20]}...)", param=name, code="invalid_value") from None


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise APIError(400, message, param=name, code="invalid_value")


def parse_completion_request(body, model_name: str, config, tokenizer) -> tuple[list[list[int]], SamplingParams, dict]:
    """Validate a /v1/completions body -> (prompt ids per prompt, params, {"stream", "include_usage"})."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}; this server accepts "
                            f"{', '.join(sorted(KNOWN_FIELDS))}", param=unknown[0], code="unknown_parameter")
    for name, noop in NOOP_FIELDS.items():
        if name in body and body[name] not in noop:
            raise APIError(400, f"{name}={json.dumps(body[name])[:80]} is not supported by this server; leave it out "
                                f"(or send {json.dumps(noop[0])})", param=name, code="unsupported_parameter")
    model = _field(body, "model", (str,))
    if model is None:
        raise APIError(400, f"model is required; this server serves {model_name!r}", param="model")
    if model != model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves {model_name!r} (GET /v1/models)",
                       param="model", code="model_not_found")
    n = _field(body, "n", (int,), 1)
    _check(n == 1, "n", f"n={n} is not supported: this server returns one choice per prompt (n=1); "
                        f"send the request n times with different seeds instead")
    max_tokens = _field(body, "max_tokens", (int,), 16)
    temperature = _number(body, "temperature", 1.0)
    # the API's range; SamplingParams checks the rest of every field below
    _check(temperature <= 2, "temperature", f"temperature must be in 0..2 (0 = greedy), got {temperature}")
    top_p = _number(body, "top_p", 1.0)
    top_k = _field(body, "top_k", (int,), 0)
    penalty = _number(body, "repetition_penalty", 1.0)
    seed = _field(body, "seed", (int,))
    _check(seed is None or seed >= 0, "seed", f"seed must be >= 0, got {seed}")
    stop = _field(body, "stop", (str, list), ())
    stop = [stop] if isinstance(stop, str) else stop
    _check(len(stop) <= 4 and all(isinstance(s, str) for s in stop), "stop",
           f"stop must be a string or a list of at most 4 strings, got {json.dumps(stop)[:80]}")
    stream = _field(body, "stream", (bool,), False)
    options = _field(body, "stream_options", (dict,), {})
    _check(not options or stream, "stream_options", "stream_options is only allowed with stream: true")
    _check(set(options) <= {"include_usage"} and isinstance(options.get("include_usage", False), bool),
           "stream_options", f"stream_options accepts only include_usage (a boolean), got {json.dumps(options)[:80]}")
    _field(body, "user", (str,))
    try:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=penalty, seed=seed, stop=tuple(stop))
    except SamplingError as e:  # the API calls max_new_tokens max_tokens
        name = API_NAMES.get(e.field, e.field)
        raise APIError(400, str(e).replace(e.field, name), param=name, code="invalid_value") from None
    prompts = _prompt_ids(body.get("prompt"), config, tokenizer)
    for i, ids in enumerate(prompts):
        try:
            check_context(len(ids), max_tokens, config.block_size, f"prompt {i}", "lower max_tokens or shorten the "
                          "prompt", "max_tokens")
        except GenerationError as e:  # OpenAI's wording first: clients look for it
            raise APIError(400, f"This model's maximum context length is {config.block_size} tokens; {e}",
                           param="max_tokens", code="context_length_exceeded") from None
    return prompts, params, {"stream": stream, "include_usage": bool(options.get("include_usage"))}


def _prompt_ids(prompt, config, tokenizer) -> list[list[int]]:
    """prompt (string | [string] | [int] | [[int]]) -> token ids per prompt, each non-empty and in the vocabulary."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(p, str) or (isinstance(p, list) and all(_is_id(t) for t in p)) for p in prompt):
        raise APIError(400, f"prompt must be a non-empty string, a list of strings, a list of token ids or a list of "
                            f"lists of token ids, got {json.dumps(prompt)[:80]}", param="prompt", code="invalid_type")
    ids = [tokenizer.encode(p, allowed_special="all") if isinstance(p, str) else p for p in prompt]
    for i, p in enumerate(ids):
        if not p:
            raise APIError(400, f"prompt {i} is empty; give at least one token", param="prompt", code="invalid_value")
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise APIError(400, f"prompt {i} has token id {bad[0]}, outside this model's vocabulary "
                                f"0..{config.vocab_size - 1}; use tokens (or text) within it", param="prompt",
                           code="invalid_value")
    return ids


def _sse(event: dict) -> str:
    """One server-sent event as OpenAI sends it: `data: {json}` and a blank line."""
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"


class _ClientGone(Exception):
    """A non-streaming client closed its connection before its answer was ready."""


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (Content-Length, or bytes read so far)."""
    too_big = APIError(413, f"request body exceeds the server's limit of {limit} bytes; send a smaller request "
                            f"(or start the server with a larger --max-body-bytes)", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def create_app(backend, tokenizer, settings: ServerSettings, draft=None, speculate: int | None = None) -> FastAPI:
    """The ASGI app serving `backend` (owned by the app's scheduler thread from startup to shutdown).

    Args:
        backend: a loaded runtime.backends Backend; nothing else may use it while the app runs.
        tokenizer: the tiktoken Encoding for text prompts and output.
        settings: ServerSettings (model name, API key, batch / queue / timeout / body limits).
        draft: a draft Backend: batches decode speculatively with it, the same output faster
            (runtime/generation/speculative.py; on a kv_cache="shared" pair, a request running alone only);
            `speculate` is its most guesses per round.
    """
    scheduler = Scheduler(backend, tokenizer, settings.max_batch, settings.max_queue, settings.batch_window_ms / 1000,
                          draft, speculate, continuous=settings.batching == "continuous")
    counts = {"requests": 0, "completed": 0, "disconnected": 0, "timed_out": 0}  # written by the event loop only
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="nanogpt-deploy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.counts = scheduler, counts

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):  # 404 / 405 from routing, in OpenAI's shape
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                       code="not_found" if e.status_code == 404 else None))

    expected = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    async def authorize(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization")
        if given is None:
            raise APIError(401, "You didn't provide an API key. Send it as a bearer token: "
                                "Authorization: Bearer YOUR_KEY", code="missing_api_key")
        if not hmac.compare_digest(given.encode(), expected):  # constant time in the key's content
            raise APIError(401, "Incorrect API key provided; send the server's key as Authorization: Bearer YOUR_KEY",
                           code="invalid_api_key")

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "nanogpt-deploy",
                "max_model_len": backend.config.block_size}

    @app.get("/health")
    async def health():
        if not scheduler.alive:  # nothing would run a request: load balancers must stop sending them
            return JSONResponse({"status": "unavailable", "model": settings.model_name,
                                 "error": "the scheduler's worker thread has stopped; restart the server"},
                                status_code=503)
        return {"status": "ok", "model": settings.model_name, "backend": backend.name, "provider": backend.provider,
                "precision": backend.precision, "block_size": backend.config.block_size,
                "running_rows": scheduler.running_rows, "queued": scheduler.queued,
                "limits": {"max_batch": settings.max_batch, "max_queue": settings.max_queue,
                           "batching": settings.batching,
                           "request_timeout_s": settings.request_timeout_s},
                "counts": dict(counts), "scheduler": dict(scheduler.stats)}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}", dependencies=[Depends(authorize)])
    async def model(model: str):
        if model != settings.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request):
        deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
        try:  # a client that trickles its body in must not hold the connection forever
            raw = await asyncio.wait_for(read_body(request, settings.max_body_bytes), settings.request_timeout_s)
        except ClientDisconnect:  # left before its body arrived: nothing to answer, nothing to log
            counts["disconnected"] += 1
            return Response(status_code=400)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {settings.request_timeout_s:g} s",
                           code="timeout") from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a 5,000-digit integer
            raise APIError(400, f"We could not parse the JSON body of your request ({e}); send a JSON object with "
                                f"Content-Type: application/json", code="invalid_json") from None
        prompts, params, opts = await asyncio.to_thread(  # tokenizing a long prompt must not stall the loop
            parse_completion_request, body, settings.model_name, backend.config, tokenizer)
        try:
            job = scheduler.submit(prompts, [params] * len(prompts))
        except Overloaded as e:
            raise APIError(429, str(e), type="server_overloaded", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except WorkerDead as e:
            raise APIError(503, str(e), type="server_error", code="scheduler_stopped") from None
        except ValueError as e:
            raise APIError(400, f"{e}; split the prompt list over several requests", param="prompt") from None
        counts["requests"] += 1
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": settings.model_name}
        usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0, "total_tokens": 0}
        if opts["stream"]:
            return _SSEResponse(_stream(job, head, usage, opts["include_usage"], deadline), job)
        return await _complete(job, head, usage, request, deadline)

    async def events(job, deadline: float):
        """("delta", j, Delta) events until every row of `job` finished; raises on timeout, error, disconnect."""
        loop, left = asyncio.get_running_loop(), len(job.prompt_ids)
        while left:
            try:
                event = job.events.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    event = await asyncio.wait_for(job.events.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    job.cancel("timeout")
                    counts["timed_out"] += 1
                    raise APIError(504, f"the request did not finish within the server's --request-timeout of "
                                        f"{settings.request_timeout_s:g} s (queueing included); lower max_tokens, or "
                                        f"retry when the server is less busy", type="timeout", code="timeout",
                                   headers={"x-should-retry": "false"}) from None  # a retry would add load
            if event[0] == "error":
                job.finished = True  # the batch is over; nothing left to cancel
                raise APIError(500, event[1], type="server_error", code="generation_failed")
            if event[0] == "disconnected":
                raise _ClientGone
            yield event
            if event[2].finish_reason:
                left -= 1
        job.finished = True
        counts["completed"] += 1

    async def _complete(job, head: dict, usage: dict, request: Request, deadline: float) -> JSONResponse:
        async def watch():  # the body is read: the next message is http.disconnect, if the client leaves
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.events.put_nowait(("disconnected",))

        texts, finish = [""] * len(job.prompt_ids), [None] * len(job.prompt_ids)
        watcher = asyncio.create_task(watch())
        try:
            async for _, j, delta in events(job, deadline):
                texts[j] += delta.text
                usage["completion_tokens"] += len(delta.token_ids)
                finish[j] = delta.finish_reason or finish[j]
        except _ClientGone:  # nobody will read this answer; the rows are cancelled below
            counts["disconnected"] += 1
            job.cancel("disconnected")
            return error_response(APIError(400, "client disconnected", code="client_disconnected"))
        finally:
            watcher.cancel()
            job.cancel("abandoned")  # no-op when finished
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choices = [{"text": t, "index": j, "logprobs": None,
                    "finish_reason": f} for j, (t, f) in enumerate(zip(texts, finish))]
        return JSONResponse({**head, "choices": choices, "usage": usage})

    async def _stream(job, head: dict, usage: dict, include_usage: bool, deadline: float):
        extra = {"usage": None} if include_usage else {}
        try:
            async for _, j, delta in events(job, deadline):
                usage["completion_tokens"] += len(delta.token_ids)
                if delta.text or delta.finish_reason:
                    choice = {"text": delta.text, "index": j, "logprobs": None, "finish_reason": delta.finish_reason}
                    yield _sse({**head, "choices": [choice], **extra})
            if include_usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield _sse({**head, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        except APIError as e:  # the 200 is already sent: the error goes in the stream (the openai client raises it)
            yield _sse(e.body)

    class _SSEResponse(StreamingResponse):
        """Server-sent events whose job is cancelled however the response ends (done, disconnect, error)."""

        def __init__(self, content, job):
            super().__init__(content, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.job = job

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                if not self.job.finished and self.job.cancelled is None:  # not a timeout: the client left
                    self.job.cancel("disconnected")
                    counts["disconnected"] += 1

    return app
