"""`nanogpt-deploy serve MODEL`: an OpenAI-compatible HTTP server (runtime/serve/server.py) on loopback by default.

    nanogpt-deploy serve out/tiny                                     # http://127.0.0.1:8000/v1
    NANOGPT_DEPLOY_API_KEY=secret nanogpt-deploy serve out/demo --host 0.0.0.0 --max-batch 32

Binding any address other than loopback needs an API key (--api-key, or the environment variable
NANOGPT_DEPLOY_API_KEY, which keeps it out of `ps`); clients then send `Authorization: Bearer KEY`.
Needs the `serve` extra: pip install 'nanogpt-deploy[serve]'.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
from pathlib import Path

from .args import add_model_flags, add_run_flags, add_tokenizer_flag, float_in, int_in

API_KEY_ENV = "NANOGPT_DEPLOY_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    add_run_flags(p, tf32=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; non-loopback addresses need an API key")
    p.add_argument("--port", type=int_in(1, 65535, "a TCP port"), default=8000, help="TCP port, 1..65535")
    p.add_argument("--api-key", default=None, help=f"require this bearer token (default: ${API_KEY_ENV}; prefer the "
                                                   f"variable, a flag shows up in `ps`)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: MODEL's folder name)")
    p.add_argument("--draft", default=None, metavar="DIR",
                   help="speculative decoding: a cheaper export of the same checkpoint (e.g. its int8 folder) guesses, "
                        "MODEL checks; same output, faster. MODEL must keep --speculate + 1 logits positions (export "
                        "--logits last:5 or all); batches speculate on a --kv-cache concat pair, lone requests on any")
    p.add_argument("--speculate", type=int_in(1, 64, "a guess count"),
                   default=None, metavar="K", help="most guesses per round with --draft (default: 4)")
    p.add_argument("--max-batch", type=int_in(1, 4096, "a batch size"),
                   default=16, help="rows per batch (shared forward passes)")
    p.add_argument("--max-queue", type=int_in(1, 1 << 16, "a queue length"),
                   default=64, help="requests waiting while a batch runs; more get 429")
    p.add_argument("--batch-window-ms", type=float_in(0, 1000, "a batching window in ms"), default=10.0,
                   help="how long a batch's first request waits for others to join, 0..1000 ms")
    p.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                   help="continuous: a request arriving while a batch runs joins it at its next step when it has "
                        "rows free (not in a speculative batch); static: it waits for the next batch")
    p.add_argument("--request-timeout", type=float_in(0, 86400, "a timeout in seconds", above=True), default=60.0,
                   help="seconds from arrival to the last token, queueing included, up to 86400; then 504 / an error "
                        "event")
    p.add_argument("--idle-timeout", type=float_in(0, 300, "a timeout in seconds", above=True), default=5.0,
                   help="seconds a connection may take to send a whole request head, from opening and between "
                        "keep-alive requests; then it is closed")
    p.add_argument("--max-body-bytes", type=int_in(1024, 1 << 30, "a body size in bytes"),
                   default=1 << 20, help="larger request bodies get 413")
    add_tokenizer_flag(p)
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja2 chat template for /v1/chat/completions, as transformers and vLLM take (default: "
                        "'role: content' lines, then 'assistant:')")
    p.add_argument("--chat-stop", action="append", default=[], metavar="STRING",
                   help="with --chat-template: a string that ends a reply besides <|endoftext|> (repeatable), e.g. "
                        "the template's end-of-turn marker")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="one line per request (method, route, status, tokens, TTFT, total time): text or JSON")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"], help="uvicorn's")


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, bound now (before the model loads and the "serving" line): a busy port or an address
    this machine lacks is an error at once, with the fix."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e}; check --host") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # uvicorn's choice: restart over TIME_WAIT sockets
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        busy = e.errno == errno.EADDRINUSE
        raise OSError(f"cannot listen on {host}:{port}: "
                      f"{'the port is already in use (another server?)' if busy else e.strerror or e}; stop the "
                      f"other process or choose another --port" + ("" if busy else " / --host")) from None
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to expose the server beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"refusing to bind {host}: it is not a loopback address and no API key is set; set "
                         f"{API_KEY_ENV} (or --api-key), or bind 127.0.0.1")


def check_limits(args) -> None:
    """What the flags' types cannot check alone (each is range-checked by argparse)."""
    if args.batch_window_ms / 1000 >= args.request_timeout:
        raise ValueError(f"--batch-window-ms {args.batch_window_ms:g} is not shorter than --request-timeout "
                         f"{args.request_timeout:g} s: every request would time out waiting for its batch; lower "
                         f"--batch-window-ms")


def check_engine_batch(backends, max_batch: int) -> None:
    """A TensorRT engine holds at most the batch it was built for: --max-batch above it would fail whole
    batches (or rows joining one) at run time, so it is refused at startup."""
    for b in backends:
        limit = getattr(getattr(b, "meta", None), "max_batch", None)
        if b is not None and limit is not None and max_batch > limit:
            raise ValueError(f"--max-batch {max_batch} exceeds the {limit} rows {getattr(b, 'path', 'the engine')} was "
                             f"built for; serve with --max-batch {limit}, or rebuild the engine with "
                             f"--max-batch {max_batch}")


def run(args) -> int:
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(args.host, api_key)  # before anything slow: a refused bind costs nothing
    check_limits(args)
    try:
        import uvicorn

        from ..serve.chat import ChatTemplate
        from ..serve.connections import uvicorn_config
        from ..serve.logs import configure_logging
        from ..serve.server import ServerSettings, create_app
    except ImportError as e:
        raise RuntimeError(f"serve needs {e.name}, which is not installed; "
                           "pip install 'nanogpt-deploy[serve]'") from None
    from ..generation import draft_for
    from ..loading import load_pair
    from ..tokenizer import load_tokenizer

    if args.chat_stop and not args.chat_template:
        raise ValueError("--chat-stop goes with --chat-template (the default template has its own stops)")
    # every startup error comes before the "serving" line: the template, the port, the tokenizer, the model
    template = ChatTemplate.from_file(args.chat_template, args.chat_stop) if args.chat_template else ChatTemplate()
    sock = bind_socket(args.host, args.port)
    try:
        tokenizer = load_tokenizer(path=args.tokenizer_file)
        # a pair that cannot speculate is refused here, at startup, not per request
        backend, draft = load_pair(args.backend, args.model, args.draft, args.speculate,
                                   provider=args.provider or "cpu", threads=args.threads,
                                   verify_weights=not args.no_verify_weights,
                                   decode=args.decode, tf32=args.tf32)
        check_engine_batch((backend, draft), args.max_batch)
        path = Path(args.model)
        folder = path.parent.name if path.suffix in (".onnx", ".engine", ".pt") else path.name
        name = args.model_name or folder or args.model
        settings = ServerSettings(model_name=name, api_key=api_key, max_batch=args.max_batch,
                                  max_queue=args.max_queue,
                                  batch_window_ms=args.batch_window_ms, batching=args.batching,
                                  request_timeout_s=args.request_timeout,
                                  max_body_bytes=args.max_body_bytes)
        app = create_app(backend, tokenizer, settings, draft, args.speculate, template)
        configure_logging(args.log_format)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving {name!r} on http://{host}:{args.port}/v1 "
              f"[{backend.name}, {backend.provider}, {backend.precision}] max batch {args.max_batch} ({args.batching}), queue {args.max_queue}, timeout {args.request_timeout:g} s"
              f"{f', speculative with {args.draft}' if draft else ''}"
              f"{' (lone requests: shared KV cache)' if draft and not draft_for(backend, draft, 2) else ''}"
              f"{', API key required' if api_key else ''}", flush=True)
        # requests in flight beyond this get a JSON 429 at once: room for every running + queued request, and as many
        # again for requests the scheduler is refusing with its own 429. Idle connections are not counted (uvicorn's
        # limit_concurrency counted them, and answered a plain 503); --idle-timeout closes them
        limit = 2 * (args.max_batch + args.max_queue) + 16
        server = uvicorn.Server(uvicorn_config(app, args.host, args.port, idle_timeout=args.idle_timeout,
                                               max_requests=limit,
                                               log_level=args.log_level, timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1
