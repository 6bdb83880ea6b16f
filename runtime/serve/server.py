"""An OpenAI-compatible HTTP server (FastAPI + uvicorn, the `serve` extra): /v1/completions, /v1/chat/completions,
/v1/models, /health, /metrics.

One process holds one model instance, driven by runtime.serve.scheduler's single worker thread: requests that
arrive together are batched into shared forward passes, later ones wait in a bounded queue, a full queue
answers 429 at once. A client that disconnects cancels its rows; every request has a deadline
(`request_timeout_s`, queueing included). Errors have OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`. The request fields each route takes are in runtime/serve/api.py; chat messages become a prompt through
a chat template (chat.py); /metrics is Prometheus text (metrics.py); each request is logged once (logs.py).

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
from typing import NamedTuple

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..generation import Delta
from .api import APIError, LogprobsWriter, error_response, parse_chat_request, parse_completion_request, sse
from .chat import ChatTemplate
from .logs import RequestObserver, log_request, record_of
from .metrics import Metrics
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


class _ClientGone(Exception):
    """A non-streaming client closed its connection before its answer was ready."""


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


def prompt_logits_missing(backend) -> str | None:
    """None when `backend` returns the logits of every prompt position (echo + logprobs needs them); else why not."""
    art = getattr(backend, "artifact", None)
    if art is None or art.logits == "all":
        return None
    return (f"{getattr(backend, 'path', 'the model')} was exported with --logits {art.logits} and returns the last "
            f"position(s) only; re-export it with --logits all")


def create_app(backend, tokenizer, settings: ServerSettings, draft=None, speculate: int | None = None,
               chat_template: ChatTemplate | None = None) -> FastAPI:
    """The ASGI app serving `backend` (owned by the app's scheduler thread from startup to shutdown).

    Args:
        backend: a loaded runtime.backends Backend; nothing else may use it while the app runs.
        tokenizer: the tiktoken Encoding for text prompts and output.
        settings: ServerSettings (model name, API key, batch / queue / timeout / body limits).
        draft: a draft Backend: batches decode speculatively with it, the same output faster
            (runtime/generation/speculative.py; on a kv_cache="shared" pair, a request running alone only);
            `speculate` is its most guesses per round.
        chat_template: how /v1/chat/completions renders messages (default: ChatTemplate(), a plain transcript).
    """
    scheduler = Scheduler(backend, tokenizer, settings.max_batch, settings.max_queue, settings.batch_window_ms / 1000,
                          draft, speculate, continuous=settings.batching == "continuous")
    metrics = Metrics(scheduler)
    scheduler.on_step = metrics.batch.observe  # each step's rows: the batch size histogram
    template = chat_template or ChatTemplate()
    no_prompt_logits = prompt_logits_missing(backend)
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
    app.state.scheduler, app.state.counts, app.state.metrics = scheduler, counts, metrics
    app.state.request_sinks = [log_request, metrics.observe_request]  # RequestCap's refusals go there too
    app.add_middleware(RequestObserver, sinks=app.state.request_sinks)

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

    @app.get("/metrics")
    async def prometheus():  # open like /health: scrapers carry no API key
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}", dependencies=[Depends(authorize)])
    async def model(model: str):
        if model != settings.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    async def read_json(request: Request):
        """The request's JSON body (None when the client left before sending it all)."""
        try:  # a client that trickles its body in must not hold the connection forever
            raw = await asyncio.wait_for(read_body(request, settings.max_body_bytes), settings.request_timeout_s)
        except ClientDisconnect:  # left before its body arrived: nothing to answer, nothing to log
            counts["disconnected"] += 1
            return None
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {settings.request_timeout_s:g} s",
                           code="timeout") from None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a 5,000-digit integer
            raise APIError(400, f"We could not parse the JSON body of your request ({e}); send a JSON object with "
                                f"Content-Type: application/json", code="invalid_json") from None

    def submit(request: Request, prompts: list[list[int]], params):
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
        job.record = record_of(request.scope)
        job.record.prompt_tokens = sum(len(p) for p in prompts)
        return job

    def usage(job) -> dict:
        r = job.record
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request):
        deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
        body = await read_json(request)
        if body is None:
            return Response(status_code=400)
        prompts, params, opts = await asyncio.to_thread(  # tokenizing a long prompt must not stall the loop
            parse_completion_request, body, settings.model_name, backend.config, tokenizer, no_prompt_logits)
        job = submit(request, prompts, params)
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": settings.model_name}
        echo, writers = opts["echo"], [LogprobsWriter(tokenizer) if params.logprobs is not None else None
                                       for _ in prompts]

        def choice(j: int, delta, first: bool) -> dict:  # one row's text (and logprobs) so far, or in this chunk
            text, lp, w = delta.text, None, writers[j]
            if first and echo:  # the prompt, before the first generated text
                text = tokenizer.decode(job.prompt_ids[j]) + text
                lp = w and w.add(job.prompt_ids[j], delta.prompt_logprobs)
            if w is not None:
                lp = _join(lp, w.add(delta.token_ids, delta.logprobs))
            return {"text": text, "index": j, "logprobs": lp, "finish_reason": delta.finish_reason}

        if opts["stream"]:
            def chunks(j, delta, first):
                c = choice(j, delta, first)
                return [{**head, "choices": [c]}] if c["text"] or c["finish_reason"] or c["logprobs"] else []
            return _SSEResponse(_stream(job, head, chunks, opts["include_usage"], deadline), job)
        rows = await _complete(job, request, deadline, choice)
        return JSONResponse({**head, "choices": rows, "usage": usage(job)})

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
        body = await read_json(request)
        if body is None:
            return Response(status_code=400)
        ids, params, opts = await asyncio.to_thread(
            parse_chat_request, body, settings.model_name, backend.config, tokenizer, template)
        job = submit(request, [ids], params)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": settings.model_name}

        def choice(j: int, delta, first: bool) -> dict:
            return {"index": 0, "message": {"role": "assistant", "content": delta.text}, "logprobs": None,
                    "finish_reason": delta.finish_reason}

        if opts["stream"]:
            head["object"] = "chat.completion.chunk"

            def chunks(j, delta, first):
                out = [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}] * first
                if delta.text:
                    out.append({"index": 0, "delta": {"content": delta.text}, "finish_reason": None})
                if delta.finish_reason:
                    out.append({"index": 0, "delta": {}, "finish_reason": delta.finish_reason})
                return [{**head, "choices": [c]} for c in out]
            return _SSEResponse(_stream(job, head, chunks, opts["include_usage"], deadline), job)
        rows = await _complete(job, request, deadline, choice)
        return JSONResponse({**head, "choices": rows, "usage": usage(job)})

    async def events(job, deadline: float):
        """(j, Delta, first) for each row's deltas until every row of `job` finished (counting its tokens, timing
        its first token and the gaps between tokens); raises on timeout, error, disconnect."""
        loop, left, last = asyncio.get_running_loop(), len(job.prompt_ids), [None] * len(job.prompt_ids)
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
            _, j, delta = event
            first = last[j] is None
            if delta.token_ids:
                now = time.perf_counter()
                if job.record.ttft_s is None:
                    job.record.first_token()
                    metrics.ttft.observe(job.record.ttft_s)
                elif last[j] not in (None, 0.0):
                    metrics.tpot.observe(now - last[j])
                last[j] = now
                job.record.completion_tokens += len(delta.token_ids)
            elif first:
                last[j] = 0.0  # the row has had its first delta (a stop at once, a scored prompt)
            yield j, delta, first
            if delta.finish_reason:
                left -= 1
        job.finished = True
        counts["completed"] += 1

    async def _complete(job, request: Request, deadline: float, choice) -> list[dict]:
        """Every row's choice (`choice(j, merged delta, True)`), once all rows are done."""
        async def watch():  # the body is read: the next message is http.disconnect, if the client leaves
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.events.put_nowait(("disconnected",))

        n = len(job.prompt_ids)
        rows = [Delta(j, "", [], logprobs=[]) for j in range(n)]
        watcher = asyncio.create_task(watch())
        try:
            async for j, delta, first in events(job, deadline):
                r = rows[j]
                r.text += delta.text
                r.token_ids += delta.token_ids
                r.logprobs += delta.logprobs or []
                r.prompt_logprobs = delta.prompt_logprobs if first else r.prompt_logprobs
                r.finish_reason = delta.finish_reason or r.finish_reason
        except _ClientGone:  # nobody will read this answer; the rows are cancelled below
            counts["disconnected"] += 1
            job.cancel("disconnected")
            raise APIError(400, "client disconnected", code="client_disconnected") from None
        finally:
            watcher.cancel()
            job.cancel("abandoned")  # no-op when finished
        return [choice(j, rows[j], True) for j in range(n)]

    async def _stream(job, head: dict, chunks, include_usage: bool, deadline: float):
        extra = {"usage": None} if include_usage else {}
        try:
            async for j, delta, first in events(job, deadline):
                for chunk in chunks(j, delta, first):
                    yield sse({**chunk, **extra})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(job)})
            yield "data: [DONE]\n\n"
        except APIError as e:  # the 200 is already sent: the error goes in the stream (the openai client raises it)
            yield sse(e.body)

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


class Loaded(NamedTuple):
    app: FastAPI
    backend: object
    draft: object
    name: str  # the model id clients send


def load_app(args, api_key: str | None, threads: int | None = None) -> Loaded:
    """The app `args` (a ray_config.ReplicaArgs: `serve`'s flags) describe, with everything it serves loaded and
    checked: the chat template, the tokenizer, the model (and draft), the engine's batch limit. The plain server
    and every Ray replica build theirs here, so both refuse the same flags with the same errors before serving.
    `threads` overrides args.threads (a Ray replica's reserved CPUs)."""
    from ..loading import load_pair
    from ..tokenizer import load_tokenizer
    from .ray_config import model_name_of

    template = ChatTemplate.from_file(args.chat_template, args.chat_stop) if args.chat_template else ChatTemplate()
    tokenizer = load_tokenizer(path=args.tokenizer_file)
    # a pair that cannot speculate is refused here, at startup, not per request
    backend, draft = load_pair(args.backend, args.model, args.draft, args.speculate, provider=args.provider or "cpu",
                               threads=threads or args.threads, verify_weights=args.verify_weights,
                               decode=args.decode, tf32=args.tf32)
    check_engine_batch((backend, draft), args.max_batch)
    name = args.model_name or model_name_of(args.model)
    settings = ServerSettings(model_name=name, api_key=api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                              batch_window_ms=args.batch_window_ms, batching=args.batching,
                              request_timeout_s=args.request_timeout, max_body_bytes=args.max_body_bytes)
    return Loaded(create_app(backend, tokenizer, settings, draft, args.speculate, template), backend, draft, name)


def check_engine_batch(backends, max_batch: int) -> None:
    """A TensorRT engine holds at most the batch it was built for: --max-batch above it would fail whole
    batches (or rows joining one) at run time, so it is refused at startup."""
    for b in backends:
        limit = getattr(getattr(b, "meta", None), "max_batch", None)
        if b is not None and limit is not None and max_batch > limit:
            raise ValueError(f"--max-batch {max_batch} exceeds the {limit} rows {getattr(b, 'path', 'the engine')} was "
                             f"built for; serve with --max-batch {limit}, or rebuild the engine with "
                             f"--max-batch {max_batch}")


def _join(a: dict | None, b: dict) -> dict:
    """Two legacy logprobs objects, one after the other."""
    return b if a is None else {k: a[k] + b[k] for k in a}
