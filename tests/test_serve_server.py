"""The OpenAI-compatible server against live uvicorn servers on 127.0.0.1 (random ports, one thread each).

The official `openai` client for completions (plain and streamed) and models; httpx and raw sockets for the
4xx / 413 / 429 / 504 paths; a slowed-down backend (a sleep before each forward) where a test needs a
request to still be running when the client leaves or the deadline passes.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from runtime.backends import load_backend  # noqa: E402
from runtime.generation import SamplingParams, generate  # noqa: E402
from runtime.serve.connections import uvicorn_config  # noqa: E402
from runtime.serve.server import ServerSettings, create_app  # noqa: E402

MODEL = "tiny"


class SlowBackend:
    """The tiny backend with a sleep before every forward (so a request is still running when a test acts),
    and optionally a first forward that fails."""

    def __init__(self, inner, delay_s: float = 0.0, fail_once: bool = False):
        self.inner, self.delay_s, self.fail_once = inner, delay_s, fail_once
        self.config, self.name = inner.config, inner.name
        self.provider, self.precision = inner.provider, inner.precision

    def reset(self, batch_size):
        self.inner.reset(batch_size)

    def rewind(self, length):
        self.inner.rewind(length)

    @property
    def artifact(self):
        return self.inner.artifact

    def keep_rows(self, rows):
        self.inner.keep_rows(rows)

    def add_rows(self, *args):
        time.sleep(self.delay_s)
        return self.inner.add_rows(*args)

    def forward(self, *args):
        time.sleep(self.delay_s)
        if self.fail_once:
            self.fail_once = False
            raise RuntimeError("injected failure")
        return self.inner.forward(*args)


@contextmanager
def serve(onnx_dir, tokenizer, delay_s=0.0, fail_once=False, draft=None, idle_timeout=5.0, max_requests=200,
          chat_template=None, **settings):
    """A live server on 127.0.0.1:<free port> with its own backend, under the CLI's uvicorn config; yields
    (base_url, app)."""
    backend = SlowBackend(load_backend("onnxruntime", onnx_dir, threads=1), delay_s, fail_once)
    app = create_app(backend, tokenizer, ServerSettings(model_name=MODEL, **settings), draft=draft,
                     chat_template=chat_template)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, idle_timeout=idle_timeout,
                                           max_requests=max_requests, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.02)
    assert server.started, "uvicorn did not start within 4 s"
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server(tiny_onnx_dir, tokenizer):
    with serve(tiny_onnx_dir, tokenizer) as (url, _):
        yield url


def client(url, api_key="unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30)


def health(url) -> dict:
    return httpx.get(f"{url}/health").json()


def wait_for(predicate, timeout=3.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_completion_matches_in_process_generate(server, tiny_onnx_dir, tokenizer):
    r = client(server).completions.create(model=MODEL, prompt="a b c", max_tokens=8, temperature=0)
    [ref] = generate(load_backend("onnxruntime", tiny_onnx_dir), tokenizer, ["a b c"],
                     SamplingParams(temperature=0, max_new_tokens=8))
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].text == ref.text, (r.choices[0].text, ref.text)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 8, 11)


def test_streaming_equals_plain_and_ends_with_done(server):
    c = client(server)
    plain = c.completions.create(model=MODEL, prompt=[[5, 6, 7], "(a, b)"], max_tokens=6, temperature=0)
    chunks = list(c.completions.create(model=MODEL, prompt=[[5, 6, 7], "(a, b)"], max_tokens=6, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    for j in range(2):
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == j)
        assert text == plain.choices[j].text
        finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].index == j][-1]
        assert finals == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12 == plain.usage.completion_tokens
    with httpx.stream("POST", f"{server}/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 3,
                                                                 "stream": True}) as r:
        body = r.read().decode()
    assert r.headers["content-type"].startswith("text/event-stream")
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1]), body


def test_stop_string_cuts_text(server):
    c = client(server)
    full = c.completions.create(model=MODEL, prompt="(a, b)", max_tokens=12, temperature=0).choices[0].text
    stop = full[4:6]
    r = c.completions.create(model=MODEL, prompt="(a, b)", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop", (full, stop)


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == [MODEL]
    h = health(server)
    assert h["status"] == "ok" and h["backend"] == "onnxruntime" and h["block_size"] == 128


def test_batched_greedy_equals_alone(tiny_onnx_dir, tokenizer):
    requests = [dict(prompt=[3, 1, 4, 1, 5], max_tokens=10, temperature=0),
                dict(prompt="a b c", max_tokens=4, temperature=0),
                dict(prompt=[[9] * 20], max_tokens=7, temperature=0),
                dict(prompt=[2, 7], max_tokens=9, temperature=0.9, seed=7)]  # seeded: its own generator per row
    with serve(tiny_onnx_dir, tokenizer, batch_window_ms=1000) as (url, _):  # threads may start late
        c = client(url)
        alone = [c.completions.create(model=MODEL, **r).choices[0].text for r in requests]
        assert health(url)["scheduler"]["largest_batch"] == 1
        with cf.ThreadPoolExecutor(len(requests)) as pool:
            batched = list(pool.map(lambda r: c.completions.create(model=MODEL, **r).choices[0].text, requests))
        assert health(url)["scheduler"]["largest_batch"] == len(requests), "the requests were not batched"
    assert batched == alone


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_request_joins_the_running_batch(tiny_onnx_dir, tokenizer, batching):
    """Continuous batching: a request arriving while another generates joins its batch at the next step and
    finishes first, with the text it gets alone; so does the long one. Static: it waits for the next batch."""
    long, short = dict(prompt=[3, 1, 4, 1, 5], max_tokens=80, temperature=0), dict(prompt="a b c", max_tokens=5,
                                                                                   temperature=0)
    with serve(tiny_onnx_dir, tokenizer, delay_s=0.02, batch_window_ms=0, batching=batching) as (url, _):
        c = client(url)
        alone = [c.completions.create(model=MODEL, **r).choices[0].text for r in (long, short)]
        with cf.ThreadPoolExecutor(1) as pool:
            first = pool.submit(lambda: c.completions.create(model=MODEL, **long).choices[0].text)
            assert wait_for(lambda: health(url)["running_rows"] == 1)
            joined = c.completions.create(model=MODEL, **short).choices[0].text
            assert first.done() == (batching == "static"), "the short request should join / wait for the long one"
            assert first.result() == alone[0]
        stats = health(url)["scheduler"]
        want = (3, 1, 2) if batching == "continuous" else (4, 0, 1)
        assert (stats["batches"], stats["rows_admitted_running"], stats["largest_batch"]) == want, stats
    assert joined == alone[1]


def test_requests_decode_speculatively_with_a_draft(tiny_onnx_dir, tokenizer):
    """serve --draft: lone requests and batches decode speculatively (runtime/generation/speculative.py), the same
    text."""
    requests = [dict(prompt=[3, 1, 4, 1, 5], max_tokens=12, temperature=0),
                dict(prompt="a b c", max_tokens=9, temperature=0.9, seed=7)]
    refs = [generate(load_backend("onnxruntime", tiny_onnx_dir), tokenizer, [r["prompt"]],
                     SamplingParams(temperature=r["temperature"], seed=r.get("seed"),
                                    max_new_tokens=r["max_tokens"]))[0].text
            for r in requests]
    draft = load_backend("onnxruntime", tiny_onnx_dir, threads=1)  # the same weights: greedy guesses all accepted
    with serve(tiny_onnx_dir, tokenizer, draft=draft, batch_window_ms=1000) as (url, _):
        c = client(url)
        alone = [c.completions.create(model=MODEL, **r).choices[0].text for r in requests]
        stats = health(url)["scheduler"]
        assert stats["speculative_batches"] == 2 and 0 < stats["guesses_accepted"] <= stats["guesses_drafted"], stats
        with cf.ThreadPoolExecutor(len(requests)) as pool:
            batched = list(pool.map(lambda r: c.completions.create(model=MODEL, **r).choices[0].text, requests))
        stats = health(url)["scheduler"]
        assert stats["largest_batch"] == 2 and stats["speculative_batches"] == 3  # concat caches: the batch too
    assert alone == batched == refs


def test_api_key_required(tiny_onnx_dir, tokenizer):
    with serve(tiny_onnx_dir, tokenizer, api_key="s3cret") as (url, _):
        body = {"model": MODEL, "prompt": [1], "max_tokens": 1}
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key", r.text
        with pytest.raises(openai.AuthenticationError) as e:
            client(url, api_key="wrong").completions.create(model=MODEL, prompt=[1], max_tokens=1)
        assert e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert client(url, api_key="s3cret").completions.create(model=MODEL, prompt=[1],
                                                                max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(f"{url}/health").status_code == 200  # liveness stays open for probes


BAD = [  # (body, status, param)
    ({"model": MODEL, "prompt": [1], "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": [1], "max_tokens": True}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": [1], "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": [1], "temperature": 3}, 400, "temperature"),
    ({"model": MODEL, "prompt": [1], "temperature": 10 ** 400}, 400, "temperature"),  # no float holds it
    ({"model": MODEL, "prompt": [1], "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "prompt": 5}, 400, "prompt"),
    ({"model": MODEL, "prompt": [1], "stop": [1]}, 400, "stop"),
    ({"model": MODEL, "prompt": [1], "frobnicate": 1}, 400, "frobnicate"),
    ({"model": MODEL, "prompt": [1], "echo": "yes"}, 400, "echo"),
    ({"model": MODEL, "prompt": [1], "logprobs": 6}, 400, "logprobs"),  # OpenAI's most: 5 alternatives
    ({"model": MODEL, "prompt": [1], "max_tokens": 0}, 400, "max_tokens"),  # 0 only with echo
    ({"model": MODEL, "prompt": [1], "best_of": 2}, 400, "best_of"),
    ({"model": MODEL, "prompt": [1], "n": 2}, 400, "n"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": []}, 400, "prompt"),
    ({"model": MODEL, "prompt": [600]}, 400, "prompt"),  # outside the tiny vocabulary
    ({"model": MODEL, "prompt": [1] * 100, "max_tokens": 29}, 400, "max_tokens"),  # 129 > block_size 128
    ({"model": MODEL, "prompt": [1], "seed": -1}, 400, "seed"),
    ({"model": MODEL, "prompt": [[1]] * 17}, 400, "prompt"),  # more prompts than --max-batch 16
    ({"model": "gpt-4", "prompt": [1]}, 404, "model"),
    ({"prompt": [1]}, 400, "model"),
    ([1, 2], 400, None),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(f"{server}/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"], err


def test_harmless_openai_fields_at_defaults_are_accepted(server):
    r = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": [1], "max_tokens": 2, "echo": False,
                                                      "logprobs": None, "best_of": 1, "presence_penalty": 0,
                                                      "frequency_penalty": 0, "user": "u1", "logit_bias": {}})
    assert r.status_code == 200, r.text


def test_invalid_json_and_unknown_route(server):
    r = httpx.post(f"{server}/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(f"{server}/v1/chat")
    assert r.status_code == 404 and "error" in r.json()
    for raw in (b'{"max_tokens": 1' + b"0" * 5000 + b"}", b"[" * 50_000 + b"]" * 50_000):  # past int / nesting limits
        r = httpx.post(f"{server}/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text


def test_a_client_leaving_mid_body_is_counted_not_raised(tiny_onnx_dir, tokenizer):
    import asyncio

    app = create_app(load_backend("onnxruntime", str(tiny_onnx_dir)), tokenizer, ServerSettings(model_name=MODEL))
    messages = [{"type": "http.request", "body": b'{"model":', "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"host", b"x")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80), "scheme": "http"}
    asyncio.run(app(scope, receive, send))  # no ClientDisconnect escapes to uvicorn's "Exception in ASGI application"
    assert sent and sent[0]["type"] == "http.response.start"


def test_oversized_body_rejected_before_read(tiny_onnx_dir, tokenizer):
    with serve(tiny_onnx_dir, tokenizer, max_body_bytes=1024) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        # a declared 1 GB body: answered 413 without waiting for (or reading) any of it
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000000000\r\n\r\n{")
            assert s.recv(4096).startswith(b"HTTP/1.1 413")
        # no Content-Length (chunked): cut off once the bytes read pass the limit
        r = httpx.post(f"{url}/v1/completions", content=(b" " * 512 for _ in range(8)))
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_overload_answers_429_at_once(tiny_onnx_dir, tokenizer):
    with serve(tiny_onnx_dir, tokenizer, delay_s=0.05, max_batch=1, max_queue=1, batch_window_ms=0) as (url, _):
        def post(_):
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 15},
                           timeout=30)
            return r, time.perf_counter() - t0

        with cf.ThreadPoolExecutor(5) as pool:
            results = list(pool.map(post, range(5)))
    refused = [(r, s) for r, s in results if r.status_code == 429]
    assert len(refused) >= 3 and all(r.status_code == 200 for r, _ in results if r.status_code != 429), \
        [r.status_code for r, _ in results]
    # at once: before any accepted request (each waits for >= 15 steps of 50 ms) could have finished
    assert max(s for _, s in refused) < min(s for r, s in results if r.status_code == 200), results
    assert refused[0][0].json()["error"]["code"] == "queue_full" and refused[0][0].headers["retry-after"] == "1"


def test_disconnect_cancels_the_row(tiny_onnx_dir, tokenizer):
    with serve(tiny_onnx_dir, tokenizer, delay_s=0.03) as (url, _):
        body = {"model": MODEL, "prompt": [1, 2], "max_tokens": 100, "stream": True}  # ~3 s if not cancelled
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
            next(r.iter_lines())  # the first event arrived: the row is generating
        assert wait_for(lambda: health(url)["scheduler"]["rows_cancelled"] == 1), health(url)
        assert wait_for(lambda: health(url)["running_rows"] == 0, 1.0)
        h = health(url)
        assert h["counts"]["disconnected"] == 1 and h["scheduler"]["tokens_generated"] < 50, h

        port = int(url.rsplit(":", 1)[1])  # a non-streaming client that leaves
        with socket.create_connection(("127.0.0.1", port)) as s:
            payload = json.dumps({"model": MODEL, "prompt": [3], "max_tokens": 100}).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            assert wait_for(lambda: health(url)["running_rows"] == 1)
        assert wait_for(lambda: health(url)["scheduler"]["rows_cancelled"] == 2), health(url)
        assert health(url)["counts"]["disconnected"] == 2


def test_request_timeout(tiny_onnx_dir, tokenizer):
    with serve(tiny_onnx_dir, tokenizer, delay_s=0.03, request_timeout_s=0.4) as (url, _):
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [1], "max_tokens": 100})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        assert time.perf_counter() - t0 < 2.5  # well before the 100 steps of 30 ms it would otherwise take
        # streamed: the 200 headers are sent already, so the timeout is an error event and there is no [DONE]
        with httpx.stream("POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": [1], "max_tokens": 100,
                                                                  "stream": True}) as r:
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and "[DONE]" not in events, events[-3:]
        assert "request-timeout" in json.loads(events[-1])["error"]["message"], events[-1]
        assert wait_for(lambda: health(url)["scheduler"]["rows_cancelled"] == 2), health(url)
        assert health(url)["counts"]["timed_out"] == 2
        port = int(url.rsplit(":", 1)[1])  # a body that never finishes arriving
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            assert s.recv(4096).startswith(b"HTTP/1.1 408")


def test_failed_batch_is_a_500_and_the_server_goes_on(tiny_onnx_dir, tokenizer):
    with serve(tiny_onnx_dir, tokenizer, fail_once=True) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [1], "max_tokens": 3})
        assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"], r.text
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [1], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def _closed_by_server(sock: socket.socket) -> bool:
    """True when the server has closed `sock` (EOF or reset), False while it is still open."""
    sock.settimeout(0.05)
    try:
        while True:  # a response may come first (keep-alive): read past it to the close
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def test_idle_and_slow_header_connections_are_closed_and_do_not_block_requests(tiny_onnx_dir, tokenizer):
    # 180 idle sockets once filled uvicorn's limit_concurrency: every request got a plain 503, and they were all still
    # open 30 s later
    stop = threading.Event()
    with serve(tiny_onnx_dir, tokenizer, idle_timeout=1.0) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        for sock in slow:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")

        def dribble():  # one more header byte per socket every 0.2 s, for ever
            while not stop.wait(0.2):
                for sock in slow:
                    try:
                        sock.send(b"X")
                    except OSError:
                        pass
        threading.Thread(target=dribble, daemon=True).start()
        try:
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 3},
                           timeout=10)
            took = time.perf_counter() - t0
            assert r.status_code == 200 and took < 3, \
                f"{r.status_code} after {took:.2f} s beside 220 idle sockets: {r.text}"
            kept = socket.create_connection(("127.0.0.1", port))  # a keep-alive connection gets the deadline again
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(2.5)  # the deadline is 1 s
            open_idle = sum(not _closed_by_server(sk) for sk in idle)
            open_slow = sum(not _closed_by_server(sk) for sk in slow)
            assert open_idle == 0 and open_slow == 0, \
                f"{open_idle}/200 idle and {open_slow}/20 slow-header connections still open 2.5 s after a 1 s deadline"
            assert _closed_by_server(kept), "a keep-alive connection was still open 2.5 s after its response"
        finally:
            stop.set()
            for sock in idle + slow:
                sock.close()


def test_requests_past_the_in_flight_cap_get_a_json_429(tiny_onnx_dir, tokenizer):
    with serve(tiny_onnx_dir, tokenizer, delay_s=0.05, max_requests=1) as (url, _):
        with cf.ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/completions", timeout=30,
                                json={"model": MODEL, "prompt": [1, 2], "max_tokens": 15})
            time.sleep(0.3)  # the first is generating (15 steps of 50 ms)
            r = httpx.get(f"{url}/v1/models")
            health, metrics = httpx.get(f"{url}/health"), httpx.get(f"{url}/metrics")  # never refused
            assert first.result().status_code == 200
        assert r.status_code == 429 and r.headers["retry-after"] == "1", (r.status_code, r.text)
        assert r.json()["error"]["type"] == "server_overloaded", r.text
        assert health.status_code == 200 and metrics.status_code == 200, (health.status_code, metrics.status_code)
        scraped = httpx.get(f"{url}/metrics").text  # the refusal is counted like any answered request
        assert 'route="/v1/models",status="429"' in scraped, scraped[:2000]


def test_health_is_503_once_the_scheduler_thread_is_dead(tiny_onnx_dir, tokenizer):
    # --batch-window-ms inf (now refused at startup) made the worker's Condition.wait(inf) raise OverflowError: the
    # thread died while /health said ok and every request waited for its timeout
    with serve(tiny_onnx_dir, tokenizer, request_timeout_s=2.0) as (url, app):
        assert httpx.get(f"{url}/health").status_code == 200
        app.state.scheduler.batch_window_s = float("inf")
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [1], "max_tokens": 3}, timeout=10)
        assert r.status_code == 504, r.text  # the request the worker died on
        assert wait_for(lambda: not app.state.scheduler.alive), "the worker thread did not die"
        h = httpx.get(f"{url}/health")
        assert h.status_code == 503 and h.json()["status"] == "unavailable", (h.status_code, h.text)
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [1], "max_tokens": 3}, timeout=10)
        took = time.perf_counter() - t0
        assert r.status_code == 503 and r.json()["error"]["code"] == "scheduler_stopped", r.text
        assert took < 1.0, f"a request to a dead scheduler took {took:.2f} s; it must be refused at once"


def test_server_settings_refuse_non_finite_timeouts():
    for bad in (dict(request_timeout_s=float("nan")), dict(request_timeout_s=0.0), dict(batch_window_ms=float("inf"))):
        with pytest.raises(ValueError, match="must be a finite number"):
            ServerSettings(model_name=MODEL, **bad)


def test_load_test_arrivals_are_all_at_once_or_a_seeded_poisson_process():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("load_test", ROOT / "scripts" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    assert load_test.arrivals(3, None, 0) == [0.0, 0.0, 0.0]
    times = load_test.arrivals(2000, 4.0, 1)
    assert times == load_test.arrivals(2000, 4.0, 1) != load_test.arrivals(2000, 4.0, 2)  # seeded by the round
    gaps = np.diff([0.0] + times)
    assert (gaps > 0).all() and abs(gaps.mean() - 0.25) < 0.02  # exponential gaps of mean 1 / rate
