"""`nanogpt-deploy serve --ray` as a user runs it (runtime/cli/serve.py's run_ray, in a process of its own with its
own local Ray cluster): it serves behind the API key it was given, the replicas get that key (they never see it as
an argument), SIGTERM lets streams still generating finish before the process exits 0, and replicas this machine
cannot hold are refused at once instead of serve.run waiting forever; `--ray-address` joins a 2-node cluster
(two raylets on this host) with a replica on each node and leaves it running. Marked `ray`; about 60 s here.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import ROOT  # noqa: E402
from runtime.backends import load_backend  # noqa: E402
from runtime.generation import SamplingParams, generate  # noqa: E402

pytestmark = pytest.mark.ray
PROMPTS = [[3 + i, 11 + 2 * i, 5 + 7 * i] for i in range(8)]
MAX_TOKENS = 120  # 3 + 120 < block_size 128: long streams, so some are still generating at SIGTERM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`nanogpt-deploy serve ... --ray` in a subprocess, its stdout read line by line on a thread."""

    def __init__(self, *flags: str, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", *flags, "--ray"], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.out.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if text in line:
                return line
        raise AssertionError(f"no {text!r} line within {timeout:g} s; rc {self.proc.poll()}, stdout {self.out}, "
                             f"stderr {self.stderr() if self.proc.poll() is not None else '(running)'}")

    def stderr(self) -> str:
        return self.proc.stderr.read()[-3000:]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def test_serve_ray_keeps_its_key_and_drains_generating_streams_on_sigterm(tiny_onnx_dir, tokenizer):
    params = SamplingParams(temperature=0, max_new_tokens=MAX_TOKENS)
    backend = load_backend("onnxruntime", tiny_onnx_dir, threads=1)
    reference = [generate(backend, tokenizer, [p], params)[0].text for p in PROMPTS]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    served = Served(str(tiny_onnx_dir), "--replicas", "2", "--replica-cpus", "0.5", "--max-batch", "2",
                    "--port", str(port), "--model-name", "tiny", env={"NANOGPT_DEPLOY_API_KEY": "k3y"})
    try:
        line = served.wait_for("serving", timeout=180)
        assert "2 replicas" in line and "API key required" in line, line
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the replicas got the key through Ray
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        started = threading.Semaphore(0)

        def one(i):
            text, times = "", []
            for n, chunk in enumerate(c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=MAX_TOKENS,
                                                           temperature=0, stream=True)):
                text += chunk.choices[0].text
                times.append(time.perf_counter())
                if n == 0:
                    started.release()
            return text, times

        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(8)]
            for _ in range(4):  # 4 streams are generating (the other 4 wait in the replicas' queues, max batch 2)
                assert started.acquire(timeout=60)
            t_term = time.perf_counter()
            served.proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=120) for f in futures]
        rc = served.proc.wait(120)
        wrong = [i for i, (text, _) in enumerate(results) if text != reference[i]]
        after = max(times[-1] for _, times in results) - t_term
        drained = sum(any(t > t_term for t in times) for _, times in results)
        print(f"\nSIGTERM with 8 streams in flight: {8 - len(wrong)}/8 completed equal to alone, {drained} of them "
              f"still receiving tokens after the signal, the last {after * 1000:.0f} ms after it; exit {rc}")
        assert not wrong, f"streams cut or changed by the drain: {wrong}"
        assert drained > 0, "every stream had ended before the signal: nothing was drained"
        assert rc == 0 and any("stopping: the replicas finish" in x for x in served.out), (rc, served.out)
    finally:
        served.kill()


def test_replicas_this_machine_cannot_hold_are_refused(tiny_onnx_dir):
    n = (os.cpu_count() or 1) + 1
    served = Served(str(tiny_onnx_dir), "--replicas", str(n), "--port", str(free_port()))
    try:
        rc = served.proc.wait(120)
        err = served.stderr()
        assert rc == 1 and (f"error: this machine's local cluster holds {n - 1} replicas of --replica-cpus 1 "
                            f"(its nodes: {n - 1} CPUs), not the {n} asked for") in err, (rc, err)
        assert not any("serving" in x for x in served.out), served.out
    finally:
        served.kill()


def test_serve_ray_joins_a_two_node_cluster_and_leaves_it_running(tiny_onnx_dir, tokenizer):
    """--ray-address: two Ray nodes (two raylets on this machine, 1 CPU each: Ray's own way to test a multi-node
    cluster on one host, ray.cluster_utils), 2 replicas of 1 CPU, so one on each node; stopping removes this app
    only, and the cluster with its Serve controller keeps running for whoever else uses it."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    served = None
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        port = free_port()
        served = Served(str(tiny_onnx_dir), "--ray-address", cluster.address, "--replicas", "2", "--port", str(port),
                        "--model-name", "tiny")
        line = served.wait_for("serving", timeout=180)
        assert f"2 replicas, {cluster.address}" in line, line
        params = SamplingParams(temperature=0, max_new_tokens=16)
        alone = generate(load_backend("onnxruntime", tiny_onnx_dir, threads=1), tokenizer, [PROMPTS[0]], params)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone[0].text, r.text
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            def alive(kind):
                return [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name.startswith(kind)]

            nodes = {a.node_id for a in alive("ServeReplica")}
            print(f"\n2 replicas on {len(nodes)} nodes of a 2-node cluster")
            assert len(nodes) == 2, [(a.name, a.node_id) for a in alive("ServeReplica")]
            again = Served(str(tiny_onnx_dir), "--ray-address", cluster.address, "--port", str(port))
            assert again.proc.wait(120) == 1
            assert "an application named 'nanogpt' already runs on this cluster" in again.stderr()
            served.proc.send_signal(signal.SIGTERM)
            assert served.proc.wait(120) == 0, served.stderr()
            assert not alive("ServeReplica") and alive("ServeController"), "the app goes, the cluster's Serve stays"
            other = free_port()  # Serve keeps its proxy on `port`: another --port would be a silent no-op
            moved = Served(str(tiny_onnx_dir), "--ray-address", cluster.address, "--port", str(other))
            assert moved.proc.wait(120) == 1
            err = moved.stderr()
            assert f"Serve already runs on this cluster with its proxy on 127.0.0.1:{port}, not 127.0.0.1:{other}" \
                in err, err
        finally:
            ray.shutdown()
    finally:
        if served is not None:
            served.kill()
        cluster.shutdown()


def test_a_replica_that_cannot_start_says_why(tiny_onnx_dir, tmp_path):
    """The replica's own error (here its tokenizer file's), not only Ray's "deploying application failed"."""
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_text("not a tiktoken file\n")
    served = Served(str(tiny_onnx_dir), "--tokenizer-file", str(bad), "--port", str(free_port()))
    try:
        rc = served.proc.wait(180)
        err = served.stderr()
        last = [ln for ln in err.splitlines() if ln.startswith("error:")]
        print(f"\n{last}")
        assert rc == 1 and last and "the Ray Serve application did not start:" in last[-1], (rc, err)
        assert "gpt2.tiktoken" in last[-1] or "tokenizer" in last[-1].lower(), last
    finally:
        served.kill()
