"""A bounded load test of `nanogpt-deploy serve`: concurrent streaming clients, checked token for token.

Starts its own server on 127.0.0.1 (or uses --url, which must be a loopback address), runs every request
once alone (the reference), then several rounds of N concurrent streaming clients with the same greedy
requests (all at once, or arriving as a Poisson process: --request-rate). Every response must end with
`data: [DONE]` and equal its reference; throughput (tokens/s, requests/s) and p50/p95 latency (time to first
token, total) are reported as a table or --json. It stops by itself: a fixed number of rounds, a
per-request timeout and an overall --deadline.

    python scripts/load_test.py                       # model/weights/pycode if present, else a random small model
    python scripts/load_test.py out/demo --clients 64 --rounds 3 --max-tokens 32 --json
    python scripts/load_test.py --url http://127.0.0.1:8000 --model-name demo
    python scripts/load_test.py out/gpt2-last5 --draft out/gpt2-int8 --clients 8 --max-batch 8   # speculative
    python scripts/load_test.py out/gpt2 --clients 32 --request-rate 4 --batching static   # Poisson arrivals, A/B

MODEL is an exported folder, or a checkpoint folder (exported to a temporary folder first; needs torch).
Exit status 1 when any response is incomplete or differs from its reference.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "model" / "weights" / "pycode"
STEMS = ["def parse", "class Node", "import os\n", "for i in range(", "if x is None:", "return [", "while True:",
         "with open(", "try:\n    ", "@property\ndef", "x = {", "print(f\"", "async def fetch", "lambda k:",
         "self.items = []", "raise ValueError("]


def build_requests(n: int, max_tokens: int, min_tokens: int | None = None) -> list[dict]:
    """n distinct greedy requests with different prompt lengths and max_tokens (max_tokens, -8, -16; or,
    with min_tokens, spread evenly from max_tokens down to min_tokens)."""
    reqs = []
    for i in range(n):
        prompt = STEMS[i % len(STEMS)] + f" # {i}\n" * (1 + i % 3)
        new = max_tokens - 8 * (i % 3) if min_tokens is None else \
            max_tokens - (max_tokens - min_tokens) * i // max(n - 1, 1)
        reqs.append({"prompt": prompt, "max_tokens": max(4, new), "temperature": 0})
    return reqs


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"--url {url}: the load test only targets loopback (127.0.0.1, ::1, localhost), got {host!r}")


def prepare_model(model: str | None, tmp: Path) -> str:
    """An exported folder to serve: MODEL itself, MODEL (a checkpoint) exported, or a random small model."""
    if model and ((Path(model) / "model.onnx").is_file() or model.endswith(".onnx")):
        return model
    sys.path.insert(0, str(ROOT))
    from export.onnx import export_onnx
    from model import GPT
    from model.config import GPTConfig

    src = model or (str(DEFAULT_MODEL) if DEFAULT_MODEL.is_dir() else None)
    if src:
        print(f"exporting {src} to {tmp / 'model'} ...", file=sys.stderr, flush=True)
        gpt = GPT.from_pretrained(src)
    else:
        print("no model given and no model/weights/pycode: exporting a random small GPT (4 layers, 128 wide, "
              "GPT-2 vocabulary)", file=sys.stderr, flush=True)
        gpt = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=50257, block_size=256)).init_weights(0)
    export_onnx(gpt, tmp / "model")
    return str(tmp / "model")


def start_server(model: str, args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "runtime.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--model-name", args.model_name, "--backend", args.backend, "--max-batch", str(args.max_batch),
           "--max-queue", str(max(args.clients, 1)), "--request-timeout", str(args.timeout)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.draft:
        cmd += ["--draft", args.draft]
    if args.batching:
        cmd += ["--batching", args.batching]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NANOGPT_DEPLOY_API_KEY", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sys.stderr)  # stdout stays the report (--json)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not answer /health within 120 s")


def arrivals(n: int, rate: float | None, seed: int) -> list[float]:
    """When each of n requests starts (seconds into the round): all at once, or a Poisson process of `rate`
    requests per second (exponential gaps, seeded by the round: every server sees the same arrivals)."""
    if not rate:
        return [0.0] * n
    return np.cumsum(np.random.default_rng(seed).exponential(1 / rate, n)).tolist()


async def one(client: httpx.AsyncClient, url: str, model: str, req: dict, delay: float = 0.0) -> dict:
    """One streaming request (sent `delay` seconds from now): its text, token count, TTFT and total seconds
    from when it was sent, and whether it ended with [DONE]."""
    await asyncio.sleep(delay)
    body = {"model": model, **req, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, tokens, done, error = None, [], 0, False, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}", "done": False}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                error = event["error"]["message"]
                break
            for choice in event["choices"]:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(choice["text"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"text": "".join(text), "tokens": tokens, "ttft_s": ttft, "total_s": time.perf_counter() - t0,
            "done": done, "error": error}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))] if xs else float("nan")


async def load_test(url: str, args) -> dict:
    reqs = build_requests(args.clients, args.max_tokens, args.min_tokens)
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(timeout=args.timeout + 10, limits=limits) as client:
        t0 = time.perf_counter()
        alone = [await one(client, url, args.model_name, r) for r in reqs]  # the reference: one request at a time
        alone_s = time.perf_counter() - t0
        bad = [i for i, a in enumerate(alone) if not a["done"]]
        if bad:
            raise SystemExit(f"reference request {bad[0]} failed alone: {alone[bad[0]]}")
        rounds, failures = [], []
        for k in range(args.rounds):
            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(client, url, args.model_name, r, delay)
                                             for r, delay in zip(reqs, arrivals(len(reqs), args.request_rate, k))))
            wall = time.perf_counter() - t0
            for i, (res, ref) in enumerate(zip(results, alone)):
                if not res["done"] or res["text"] != ref["text"] or res["tokens"] != ref["tokens"]:
                    failures.append({"round": k, "request": i, "done": res["done"], "error": res.get("error"),
                                     "got": res.get("text"), "want": ref["text"]})
            rounds.append({"wall_s": wall, "results": results})
        health = (await client.get(f"{url}/health")).json()
    results = [r for rd in rounds for r in rd["results"] if r.get("ttft_s") is not None]
    tokens = sum(r["tokens"] for rd in rounds for r in rd["results"])
    wall = sum(rd["wall_s"] for rd in rounds)
    return {
        "clients": args.clients, "rounds": args.rounds, "request_rate": args.request_rate,
        "requests": args.clients * args.rounds,
        "complete_and_equal": args.clients * args.rounds - len(failures), "failures": failures[:10],
        "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
        "requests_per_s": args.clients * args.rounds / wall,
        "ttft_p50_s": pct([r["ttft_s"] for r in results], 50), "ttft_p95_s": pct([r["ttft_s"] for r in results], 95),
        "total_p50_s": pct([r["total_s"] for r in results], 50),
        "total_p95_s": pct([r["total_s"] for r in results], 95),
        "alone": {"seconds": alone_s, "tokens_per_s": sum(a["tokens"] for a in alone) / alone_s,
                  "ttft_p50_s": pct([a["ttft_s"] for a in alone], 50),
                  "total_p50_s": pct([a["total_s"] for a in alone], 50)},
        "server": {k: health.get(k) for k in ("model", "backend", "provider", "precision", "limits", "scheduler")},
        "machine": f"{os.cpu_count()} CPU cores ({sys.platform})",
    }


def print_table(r: dict) -> None:
    s = r["server"]
    arrive = f"Poisson-arriving ({r['request_rate']:g} req/s)" if r.get("request_rate") else "concurrent"
    print(f"\n{r['clients']} {arrive} streaming clients x {r['rounds']} rounds against {s['model']} "
          f"[{s['backend']}, {s['provider']}, {s['precision']}], max batch {s['limits']['max_batch']}; {r['machine']}")
    print(f"{'':22}{'tokens/s':>10}{'req/s':>8}{'TTFT p50':>10}{'TTFT p95':>10}{'total p50':>11}{'total p95':>11}")
    print(f"{'Poisson' if r.get('request_rate') else 'concurrent'} (batched)".ljust(22)
          + f"{r['tokens_per_s']:>10.1f}{r['requests_per_s']:>8.2f}{r['ttft_p50_s']:>9.3f}s"
          f"{r['ttft_p95_s']:>9.3f}s{r['total_p50_s']:>10.3f}s{r['total_p95_s']:>10.3f}s")
    a = r["alone"]
    print(f"{'one at a time':22}{a['tokens_per_s']:>10.1f}{r['clients'] / a['seconds']:>8.2f}"
          f"{a['ttft_p50_s']:>9.3f}s{'':>10}{a['total_p50_s']:>10.3f}s")
    sch = s["scheduler"]
    print(f"{r['complete_and_equal']}/{r['requests']} responses complete ([DONE]) and equal to the request alone; "
          f"{sch['batches']} batches ({s['limits'].get('batching', 'static')}; "
          f"{sch.get('rows_admitted_running', 0)} rows "
          f"joined a running one), largest {sch['largest_batch']} rows, {sch['rows_cancelled']} rows cancelled"
          + (f"; {sch['speculative_batches']} speculative, {sch['guesses_accepted']}/{sch['guesses_drafted']} guesses "
             f"accepted" if sch.get("speculative_batches") else ""))
    for f in r["failures"]:
        print(f"  FAIL round {f['round']} request {f['request']}: done={f['done']} error={f['error']} "
              f"got {f['got']!r} want {f['want']!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None, help="exported folder, or a checkpoint folder to export "
                                                          "(default: model/weights/pycode, else a random small model)")
    p.add_argument("--url", default=None, help="an already running server (loopback only); else one is started")
    p.add_argument("--model-name", default="load-test", help="the model id to request")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--threads", type=int, default=None, help="the started server's intra-op threads")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=None, metavar="R",
                   help="send each round's requests as a Poisson process of R requests/s (default: all at once)")
    p.add_argument("--min-tokens", type=int, default=None,
                   help="spread the requests' max_tokens evenly from --max-tokens down to this (rows of a batch "
                        "then finish at different steps)")
    p.add_argument("--max-batch", type=int, default=32, help="the started server's --max-batch")
    p.add_argument("--batching", choices=("continuous", "static"), default=None,
                   help="the started server's --batching (default: the server's, continuous)")
    p.add_argument("--draft", default=None, metavar="DIR", help="the started server's --draft (speculative decoding)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (seconds)")
    p.add_argument("--deadline", type=float, default=900.0, help="give up after this many seconds in all")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = p.parse_args()
    if args.url:
        check_loopback(args.url)
        if args.draft:
            p.error("--draft configures the server this script starts; start yours with `serve MODEL --draft DIR`")
    proc = None
    with tempfile.TemporaryDirectory(prefix="load_test_") as tmp:
        try:
            url = args.url
            if url is None:
                proc, url = start_server(prepare_model(args.model, Path(tmp)), args)
            report = asyncio.run(asyncio.wait_for(load_test(url.rstrip("/"), args), args.deadline))
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print_table(report)
    return 0 if not report["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
