"""Ray Serve: the OpenAI-compatible server of server.py on several replicas, on one machine or a Ray cluster.

Each replica is one Ray actor holding one model and its own Scheduler, so continuous batching stays inside the
replica; its HTTP routes are the FastAPI app create_app builds, bound late (`__serve_build_asgi_app__`, after the
model has loaded in the replica), so requests are parsed, refused and answered by the same code as the plain
server. Ray's HTTP proxy sends each request to a replica with few ongoing requests, adds and removes replicas on
ongoing requests per replica (`autoscaling_config`), restarts a replica whose process dies or whose scheduler
thread has stopped (`check_health`), and lets a replica it stops finish its in-flight requests first
(`graceful_shutdown_timeout_s`; then the app's lifespan closes its scheduler). Needs the `ray` extra.

    nanogpt-deploy serve out/tiny --ray --replicas 2                      # a local cluster (runtime/cli/serve.py)
    nanogpt-deploy serve out/tiny --ray --write-config ray.yaml && serve deploy ray.yaml   # Ray's own CLI
    serve run runtime.serve.ray_app:build_app model=/abs/out/tiny        # the application builder, by hand
"""
from __future__ import annotations

import ray
from ray import serve

from .ray_config import API_KEY_ENV, APP_NAME, ReplicaArgs, api_key_of


@serve.deployment(name=APP_NAME)
@serve.ingress()
class NanoGPT:
    """One replica: the model, its scheduler and the app serving them, built in the replica's own process."""

    def __init__(self, args: dict):
        from .logs import configure_logging
        from .server import load_app

        a = ReplicaArgs(**args)
        # onnxruntime's threads: the CPUs Ray reserved for this replica (not every core of the node, which the
        # replicas packed on it would fight over), unless the args name a count
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        self._nanogpt_app = load_app(a, api_key_of(a), threads=a.threads or max(1, int(cpus))).app
        configure_logging(a.log_format)

    def __serve_build_asgi_app__(self):
        return self._nanogpt_app  # Ray runs its lifespan (the scheduler starts) before the first request

    def check_health(self) -> None:
        """Ray's periodic probe: a replica whose scheduler thread has stopped answers nothing but 503, so it is
        reported unhealthy and Ray replaces it."""
        if not self._nanogpt_app.state.scheduler.alive:
            raise RuntimeError("the scheduler's worker thread has stopped")


def build_app(args: dict) -> serve.Application:
    """Ray's application builder (`import_path: runtime.serve.ray_app:build_app` in a config, with `args:`): one
    NanoGPT deployment serving `args["model"]`, the args checked here, before any replica starts (ReplicaArgs).
    Replica counts and autoscaling are the config's `deployments:`."""
    return NanoGPT.bind(ReplicaArgs.model_validate(args).model_dump())


def bind_app(args: ReplicaArgs, options: dict, api_key: str | None = None) -> serve.Application:
    """The application `serve --ray` runs: build_app's, with deployment_options' `options`; an API key travels
    to the replicas as their environment variable (Ray's runtime_env), never as an argument."""
    options = {**options, "ray_actor_options": dict(options.get("ray_actor_options", {}))}
    if api_key:
        runtime_env = dict(options["ray_actor_options"].get("runtime_env", {}))
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), API_KEY_ENV: api_key}
        options["ray_actor_options"]["runtime_env"] = runtime_env
    return NanoGPT.options(**options).bind(args.model_dump())


