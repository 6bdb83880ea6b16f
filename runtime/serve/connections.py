"""How the server's connections are held: an idle / slow-header deadline and a JSON 429 past a request cap.

uvicorn's h11 protocol times a connection out only between two requests, and only until the next byte
arrives: a connection that never sends anything, or sends half a header line every few seconds, stays
open for ever. Its `limit_concurrency` counts those connections too and answers every new request with
a plain-text 503 once they fill it (180 idle sockets did). Here instead:

- every connection must deliver a complete request head within `idle_timeout` seconds of opening, and
  again of its previous response (keep-alive); otherwise it is closed. The body is the app's to time
  (server.py: --request-timeout, then 408);
- requests in flight (not connections) are capped; one over the cap is answered at once with OpenAI's
  error shape, 429 and `Retry-After`, like a full scheduler queue.

    config = uvicorn_config(app, "127.0.0.1", 8000, idle_timeout=5, max_requests=200)
    uvicorn.Server(config).run()
"""
from __future__ import annotations

import json
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head (set by uvicorn_config: `head_timeout`)."""

    head_timeout = 5.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        self._arm_head_timer()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a whole request head arrived: the app times the rest
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:  # kept alive: a new deadline
            self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()  # nothing was answered on it yet: closing is all HTTP asks (RFC 9112 9.6)


class RequestCap:
    """ASGI middleware: at most `limit` HTTP requests in flight; the next ones get a JSON 429 at once. `/health` and
    `/metrics` are never refused (a saturated server must stay visible to its load balancer and its scraper), and
    each refusal is handed to the app's request sinks (`app.state.request_sinks`: the log line and the metrics),
    as an answered request is."""

    UNCAPPED = ("/health", "/metrics")

    def __init__(self, app, limit: int):
        self.app, self.limit, self.active = app, limit, 0
        self.sinks = list(getattr(getattr(app, "state", None), "request_sinks", ()))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.UNCAPPED:
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            from .logs import RequestRecord

            record = RequestRecord(scope["method"], route=scope.get("path", "unmatched"), status=429)
            body = json.dumps({"error": {
                "message": f"server busy: {self.active} requests in flight, the most this server takes at once; "
                           f"retry later, or start the server with a larger --max-queue / --max-batch",
                "type": "server_overloaded", "param": None, "code": "too_many_requests"}}).encode()
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            record.total_s = time.perf_counter() - record.start
            for sink in self.sinks:
                sink(record)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def uvicorn_config(app, host: str, port: int, *, idle_timeout: float, max_requests: int, **options) -> uvicorn.Config:
    """The uvicorn.Config the server runs under: h11 with a request-head deadline of `idle_timeout` seconds (also
    its keep-alive timeout), no connection limit (idle connections must not refuse requests), and at most
    `max_requests` requests in flight (RequestCap). `options` go to uvicorn.Config as they are."""
    if not 0 < idle_timeout < float("inf") or max_requests < 1:
        raise ValueError(f"idle_timeout ({idle_timeout}) must be a finite number of seconds > 0 and max_requests "
                         f"({max_requests}) >= 1")
    protocol = type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"head_timeout": float(idle_timeout)})
    # uvicorn's keep-alive timer takes whole seconds; the head deadline above is the exact one
    return uvicorn.Config(RequestCap(app, max_requests), host=host, port=port, http=protocol,
                          timeout_keep_alive=max(1, int(idle_timeout + 0.999)), limit_concurrency=None, **options)
