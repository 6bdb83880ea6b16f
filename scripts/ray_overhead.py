"""What Ray Serve's ingress adds per request: the plain `serve` (uvicorn, its own process, as users run it) and the
same app on one Ray Serve replica (runtime/serve/ray_app.py, a process of Ray's behind Ray's proxy), same model,
same thread count, one after the other in one run; p50 / p95 latency per request, sequential and with concurrent
clients. Neither server shares a process with the clients. Prints numbers; not a test. Needs the `ray` extra.

    python scripts/ray_overhead.py                       # the tiny random model, exported to a temporary folder
    python scripts/ray_overhead.py out/demo --requests 200 --max-tokens 32
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(url: str, model: str, requests: int, clients: int, max_tokens: int, stream: bool) -> np.ndarray:
    """Seconds per request (arrival -> last byte) for `requests` requests from `clients` threads."""
    import httpx

    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": max_tokens, "temperature": 0, "stream": stream}

    def worker(n: int) -> list[float]:
        out = []
        with httpx.Client(timeout=60) as c:  # one keep-alive connection per client, as an SDK holds
            for _ in range(n):
                t0 = time.perf_counter()
                r = c.post(f"{url}/v1/completions", json=body)
                r.raise_for_status()
                out.append(time.perf_counter() - t0)
        return out

    worker(5)  # warm up: connections, the first batch
    with cf.ThreadPoolExecutor(clients) as pool:
        parts = pool.map(worker, [requests // clients] * clients)
    return np.array([t for p in parts for t in p])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None, help="exported folder (default: the tiny random model)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import ray
    from ray import serve

    from runtime.serve.ray_app import bind_app
    from runtime.serve.ray_config import APP_NAME, ReplicaArgs, deployment_options

    model = args.model
    if model is None:
        from export.onnx import export_onnx
        from model import GPT

        model = tempfile.mkdtemp(prefix="ray-overhead-")
        export_onnx(GPT.from_pretrained("random:tiny@0"), model)
    name = "m"
    runs = [(1, False), (1, True), (8, False)]  # (clients, stream)
    results = {}

    # the plain server: `nanogpt-deploy serve` in a process of its own
    port = free_port()
    log = tempfile.TemporaryFile("w+")  # its request lines and errors, out of the table's way
    server = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", model, "--port", str(port),
                               "--threads", str(args.threads), "--model-name", name], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = server.stdout.readline()  # "serving ..." once it listens; "" when it exits
        if "serving" not in line:
            log.seek(0)
            raise RuntimeError(f"the plain server did not start: {line!r} {log.read()[-2000:]}")
        for clients, stream in runs:
            results["plain", clients, stream] = measure(f"http://127.0.0.1:{port}", name, args.requests, clients,
                                                        args.max_tokens, stream)
    finally:
        server.terminate()
        server.wait(30)

    # the same app on one Ray Serve replica, behind Ray's proxy
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(bind_app(ReplicaArgs(model=str(Path(model).resolve()), model_name=name, threads=args.threads),
                           deployment_options(1)), name=APP_NAME, route_prefix="/")
        for clients, stream in runs:
            results["ray", clients, stream] = measure(f"http://127.0.0.1:{port}", name, args.requests, clients,
                                                      args.max_tokens, stream)
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\n{args.requests} requests each, prompt 3 tokens, max_tokens {args.max_tokens}, {args.threads} "
          f"onnxruntime thread(s), one model each; {os.cpu_count()} CPUs")
    print("| load | plain p50 | plain p95 | Ray p50 | Ray p95 | Ray - plain (p50) |")
    print("|---|---:|---:|---:|---:|---:|")
    for clients, stream in runs:
        a, b = results["plain", clients, stream], results["ray", clients, stream]
        pa, pb = np.percentile(a, [50, 95]) * 1000, np.percentile(b, [50, 95]) * 1000
        label = f"{clients} client{'s' if clients > 1 else ''}{', streamed' if stream else ''}"
        print(f"| {label} | {pa[0]:.1f} ms | {pa[1]:.1f} ms | {pb[0]:.1f} ms | {pb[1]:.1f} ms | "
              f"+{pb[0] - pa[0]:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
