"""`serve --ray` (runtime/serve/ray_app.py) on a local Ray cluster (2 CPUs) with the tiny model: two replicas
answer concurrent streams as the requests alone, a replica killed under load costs only the requests it held (with
an error, none silently wrong) and comes back, and autoscaling adds replicas under load and removes them idle, as
Ray's own state reports. Marked `ray`; skipped without the `ray` extra. The whole file: about a minute here.

    pytest -m ray tests/test_serve_ray.py -s       # -s prints the counts docs/serving.md records
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
serve = pytest.importorskip("ray.serve")

from conftest import ROOT  # noqa: E402
from runtime.backends import load_backend  # noqa: E402
from runtime.generation import SamplingParams, generate  # noqa: E402
from runtime.serve.ray_config import APP_NAME, ReplicaArgs, deployment_options  # noqa: E402

pytestmark = pytest.mark.ray
MODEL = "tiny"
PROMPTS = [[1 + i, 2 + 3 * i, 7 + 5 * i] for i in range(32)]  # token ids, all in the tiny vocabulary (512)
MAX_TOKENS = 96  # 3 + 96 < block_size 128
# Ray pushes the ongoing-request counts autoscaling reads every 10 s by default; every second keeps the test short
FAST_METRICS = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with Serve's proxy on a free loopback port; yields the base URL."""
    saved = {k: os.environ.get(k) for k in FAST_METRICS}
    os.environ.update(FAST_METRICS)  # the raylet and every Ray process started below inherit them
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    # the replicas import this checkout's runtime package, as the test does
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **FAST_METRICS}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def deploy(onnx_dir, **options):
    from runtime.serve.ray_app import bind_app

    args = ReplicaArgs(model=str(onnx_dir), model_name=MODEL)  # threads: 1, from the replica's 0.5 CPUs
    opts = deployment_options(replica_cpus=0.5, **options)  # up to 4 replicas fit in the 2 CPUs
    t0 = time.perf_counter()
    serve.run(bind_app(args, opts), name=APP_NAME, route_prefix="/")
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def two_replicas(cluster, tiny_onnx_dir):
    print(f"\n2 replicas running {deploy(tiny_onnx_dir, replicas=2):.1f} s after serve.run")
    return cluster


@pytest.fixture(scope="module")
def reference(tiny_onnx_dir, tokenizer):
    """Each prompt's greedy text, generated alone in this process."""
    backend = load_backend("onnxruntime", tiny_onnx_dir, threads=1)
    params = SamplingParams(temperature=0, max_new_tokens=MAX_TOKENS)
    return [generate(backend, tokenizer, [p], params)[0].text for p in PROMPTS]


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def replica_counts() -> dict:
    """Ray's own view: replica state -> count for the app's deployment."""
    return dict(serve.status().applications[APP_NAME].deployments[APP_NAME].replica_states)


def replica_actors() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#"))


def served_by_each() -> list[int]:
    """Completed requests per running replica, read from each replica's own app."""
    return [replica_state(name, lambda app: app.state.counts["completed"]) for name in replica_actors()]


def replica_state(name: str, read):
    """read(app) run inside the replica actor `name` on its nanogpt app (Ray Serve's replica internals, ray 2.60:
    Ray's public metrics need a Prometheus setup this test does not have)."""
    def call(actor):
        return read(actor._replica_impl._user_callable_wrapper.user_callable._nanogpt_app)

    return ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(call))


def stream(c, i: int, on_token=None) -> str:
    text = ""
    for n, chunk in enumerate(c.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=MAX_TOKENS,
                                                   temperature=0, stream=True)):
        text += chunk.choices[0].text
        if on_token is not None and n == 4:
            on_token()
    return text


def wait_until(predicate, timeout: float, step: float = 0.25) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return True
        time.sleep(step)
    return False


def test_two_replicas_answer_32_concurrent_streams_as_each_alone(two_replicas, reference):
    c = client(two_replicas)
    before = served_by_each()
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(lambda i: stream(c, i), range(32)))
    print(f"32 concurrent streams in {time.perf_counter() - t0:.2f} s")
    wrong = [i for i in range(32) if texts[i] != reference[i]]
    assert not wrong, f"{len(wrong)}/32 differ from the request alone, e.g. #{wrong[0]}: {texts[wrong[0]]!r}"
    assert replica_counts() == {"RUNNING": 2}
    each = [n - m for n, m in zip(served_by_each(), before)]
    print(f"requests served by each replica: {each}")
    assert sum(each) == 32 and min(each) > 0, f"both replicas should serve: {each}"
    threads = [replica_state(name, lambda app: app.state.scheduler.backend.session.get_session_options()
                             .intra_op_num_threads) for name in replica_actors()]
    assert threads == [1, 1], f"a replica of 0.5 CPU runs 1 onnxruntime thread, not every core: {threads}"


def test_the_ingress_is_the_plain_servers_app(two_replicas):
    """Routes, errors and health come from create_app's app inside the replica: the same shapes."""
    assert [m.id for m in client(two_replicas).models.list().data] == [MODEL]
    r = httpx.post(f"{two_replicas}/v1/completions", json={"model": "nope", "prompt": "a"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    h = httpx.get(f"{two_replicas}/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL, h
    assert "nanogpt_requests_total" in httpx.get(f"{two_replicas}/metrics").text
    with pytest.raises(openai.BadRequestError, match="outside this model's vocabulary 0..511"):  # the chat template's
        client(two_replicas).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}])


def test_a_replica_killed_under_load_fails_only_its_requests_and_returns(two_replicas, reference):
    before = replica_actors()
    assert len(before) == 2, before
    victim = ray.get_actor(before[0], namespace="serve")
    def held(app):
        return app.state.counts["requests"], app.state.counts["completed"]

    survivor_before = replica_state(before[1], held)
    pid = ray.get(victim.__ray_call__.remote(lambda self: os.getpid()))
    streaming = threading.Semaphore(0)
    c = client(two_replicas)

    def one(i):
        try:
            return "completed", stream(c, i, streaming.release)
        except (openai.APIConnectionError, openai.APIStatusError) as e:  # a cut stream, or a 5xx before any byte
            return "failed", f"{type(e).__name__}: {e}; cause: {e.__cause__!r}"

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(one, i) for i in range(32)]
        for _ in range(8):  # 8 streams are generating: the load is under way
            assert streaming.acquire(timeout=30)
        os.kill(pid, signal.SIGKILL)
        done, lost = cf.wait(futures, timeout=60)
    results = [f.result() for f in done]
    completed = [i for i, f in enumerate(futures) if f in done and f.result()[0] == "completed"]
    wrong = [i for i in completed if futures[i].result()[1] != reference[i]]
    failed = [r[1] for r in results if r[0] == "failed"]
    print(f"replica killed under 32 streams: {len(completed)} completed (all equal to alone: {not wrong}), "
          f"{len(failed)} failed with an error, {len(lost)} lost, in {time.perf_counter() - t0:.2f} s; "
          f"e.g. {failed[0] if failed else None}")
    assert not wrong, f"{len(wrong)} completed requests differ from the request alone (silently wrong)"
    assert not lost, f"{len(lost)} requests neither completed nor failed within 60 s"
    assert failed and completed, "the kill should cost some requests, and only some"
    assert all("APIConnectionError" in f or "InternalServerError" in f for f in failed), failed[:3]
    got, done_there = (a - b for a, b in zip(replica_state(before[1], held), survivor_before))
    print(f"the surviving replica received {got} requests and completed {done_there}")
    assert got == done_there == len(completed), "every request the surviving replica received should complete, " \
                                                "and every completed one came from it: no other request is affected"
    t1 = time.perf_counter()
    back = wait_until(lambda: replica_counts() == {"RUNNING": 2} and before[0] not in replica_actors()
                      and len(replica_actors()) == 2, timeout=60)
    assert back, f"Ray did not replace the killed replica within 60 s: {replica_counts()}, {replica_actors()}"
    print(f"2 replicas running again {time.perf_counter() - t1:.1f} s after the load ended")
    assert stream(c, 0) == reference[0]


def test_autoscaling_adds_replicas_under_load_and_removes_them_idle(cluster, tiny_onnx_dir, reference):
    deploy(tiny_onnx_dir, min_replicas=1, max_replicas=3, target_ongoing=2, upscale_delay_s=1.0,
           downscale_delay_s=3.0)
    assert wait_until(lambda: replica_counts() == {"RUNNING": 1}, timeout=30), replica_counts()
    stop, peak, c = threading.Event(), [1], client(cluster)

    def load(i):
        n = 0
        while not stop.is_set():
            assert stream(c, i % 32) == reference[i % 32]
            n += 1
        return n

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(8) as pool:
        workers = [pool.submit(load, i) for i in range(8)]
        up = wait_until(lambda: peak.append(replica_counts().get("RUNNING", 0)) or peak[-1] >= 2, timeout=60)
        t_up = time.perf_counter() - t0
        time.sleep(2)
        peak.append(replica_counts().get("RUNNING", 0))
        stop.set()
        served = sum(w.result() for w in workers)
    assert up, f"no replica was added within 60 s under 8 streams at target 2: {replica_counts()}"
    t1 = time.perf_counter()
    down = wait_until(lambda: replica_counts() == {"RUNNING": 1}, timeout=60)
    print(f"autoscaling 1..3 at target 2 ongoing: a 2nd replica running {t_up:.1f} s into the load, {max(peak)} "
          f"at the peak "
          f"({served} streams, all equal to alone), back to {replica_counts()} {time.perf_counter() - t1:.1f} s "
          f"after it ended")
    assert down, f"idle replicas were not removed within 60 s: {replica_counts()}"
