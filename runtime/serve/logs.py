"""One log line per request (logger `nanogpt_deploy.requests`, INFO), as text or JSON, and the ASGI middleware that
times each request and hands its record to the log and the metrics.

    POST /v1/completions 200 prompt_tokens=5 completion_tokens=16 ttft=0.012s total=0.084s
    {"method": "POST", "route": "/v1/completions", "status": 200, "prompt_tokens": 5, ...}   # --log-format json

`configure_logging("text" | "json")` (the serve command calls it) puts a handler on the `nanogpt_deploy` loggers
at INFO; without it (an app in a test) nothing is printed. Routes are the app's route templates
(`/v1/models/{model}`); a path no route matched is logged and counted as `unmatched`.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field

log = logging.getLogger("nanogpt_deploy.requests")


@dataclass
class RequestRecord:
    """What one request did; the route's handler fills in the tokens and the time to first token."""
    method: str
    route: str = "unmatched"
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    start: float = field(default_factory=time.perf_counter, repr=False)

    def first_token(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.start

    def line(self) -> str:
        ttft = "-" if self.ttft_s is None else f"{self.ttft_s:.3f}s"
        return (f"{self.method} {self.route} {self.status} prompt_tokens={self.prompt_tokens} "
                f"completion_tokens={self.completion_tokens} ttft={ttft} total={self.total_s:.3f}s")

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["start"]
        return d


def record_of(scope) -> RequestRecord | None:
    """The record of the request `scope` belongs to (from a route handler: request.scope)."""
    return scope.get("nanogpt_deploy.record")


class RequestObserver:
    """ASGI middleware: a RequestRecord per HTTP request, finished (status, total time, route) when the response
    has been sent, streamed ones included, then handed to each of `sinks`."""

    def __init__(self, app, sinks=()):
        self.app, self.sinks = app, list(sinks)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = scope["nanogpt_deploy.record"] = RequestRecord(scope["method"])

        async def observed_send(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except BaseException:
            record.status = record.status or 500
            raise
        finally:
            route = scope.get("route")
            record.route = getattr(route, "path", None) or "unmatched"
            record.total_s = time.perf_counter() - record.start
            for sink in self.sinks:
                sink(record)


def log_request(record: RequestRecord) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(record.line(), extra={"record": record.to_dict()})


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a request's fields when it is one."""

    def format(self, r: logging.LogRecord) -> str:
        out = {"time": self.formatTime(r, "%Y-%m-%dT%H:%M:%S"), "level": r.levelname.lower(), "logger": r.name}
        out.update(getattr(r, "record", None) or {"message": r.getMessage()})
        if r.exc_info:
            out["exception"] = self.formatException(r.exc_info)
        return json.dumps(out)


def configure_logging(fmt: str = "text", stream=None) -> None:
    """Print the server's own logs (requests, scheduler errors) at INFO, as "text" lines or "json" objects."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger("nanogpt_deploy")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
