"""The Ray Serve application's settings, without Ray: what each replica loads (ReplicaArgs, which the plain
`serve` loads by too), the deployment's replica counts, autoscaling, drain and resources (deployment_options,
capacity_problem), and a Ray Serve config file for `serve deploy` (config_of, write_config). `serve --ray` checks
its flags here before Ray is imported; ray_app.py runs them.

    options = deployment_options(min_replicas=1, max_replicas=4)           # autoscaled on ongoing requests
    write_config("ray.yaml", config_of(ReplicaArgs(model="/abs/out/tiny"), options, "127.0.0.1", 8000))
"""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator

APP_NAME = "nanogpt"  # the Serve application's name and its deployment's
IMPORT_PATH = "runtime.serve.ray_app:build_app"
API_KEY_ENV = "NANOGPT_DEPLOY_API_KEY"  # runtime/cli/serve.py's; read in the replica, never written to a config


class ReplicaArgs(BaseModel):
    """What a server (the plain one, or each Ray replica) loads and how it serves: `serve`'s flags, by the names of
    their dests. Ray hands a builder's args over as strings from `serve run ... key=value`: pydantic converts them,
    and refuses an unknown key by name.

    threads None: a Ray replica runs as many onnxruntime threads as the CPUs Ray reserved for it (ray_app.py), the
    plain server the backend's default. require_api_key: the replica refuses to start without
    $NANOGPT_DEPLOY_API_KEY (api_key_of), set where the app was launched or its config written with a key, so a
    node missing the variable cannot serve an exposed address to anyone."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    backend: str = "onnxruntime"
    provider: str | None = None
    decode: str = "auto"
    threads: int | None = None
    verify_weights: bool = True
    tf32: bool = False
    draft: str | None = None
    speculate: int | None = None
    tokenizer_file: str | None = None
    model_name: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    batch_window_ms: float = 10.0
    batching: str = "continuous"
    request_timeout: float = 60.0
    max_body_bytes: int = 1 << 20
    chat_template: str | None = None
    chat_stop: list[str] = []
    log_format: str = "text"
    require_api_key: bool = False

    @model_validator(mode="after")
    def _chat_stop_needs_a_template(self):
        check_chat_flags(self.chat_template, self.chat_stop)
        return self


def check_chat_flags(chat_template: str | None, chat_stop: list[str]) -> None:
    if chat_stop and not chat_template:
        raise ValueError("--chat-stop goes with --chat-template (the default template has its own stops)")


def api_key_of(args: ReplicaArgs) -> str | None:
    """The replica's API key ($NANOGPT_DEPLOY_API_KEY); refused when `args` require one and the variable is unset."""
    key = os.environ.get(API_KEY_ENV) or None
    if args.require_api_key and not key:
        raise RuntimeError(f"this app was launched with an API key, and ${API_KEY_ENV} is not set on this node: "
                           f"set it on every node (or in the config's runtime_env env_vars), or write the config "
                           f"without a key for a loopback-only server")
    return key


def model_name_of(model: str) -> str:
    """The id clients send by default: MODEL's folder name (the folder holding a model file given by name)."""
    path = Path(model)
    return (path.parent.name if path.suffix in (".onnx", ".engine", ".pt") else path.name) or model


def deployment_options(replicas: int | None = None, min_replicas: int | None = None, max_replicas: int | None = None,
                       *, max_batch: int = 16, max_queue: int = 64, request_timeout: float = 60.0,
                       target_ongoing: float | None = None, upscale_delay_s: float = 10.0,
                       downscale_delay_s: float = 60.0, replica_cpus: float = 1.0, replica_gpus: float = 0.0) -> dict:
    """The Ray Serve deployment options (as `Deployment.options` and a config file's `deployments:` take them).

    Args:
        replicas: a fixed replica count; or min_replicas..max_replicas, autoscaled on ongoing requests per replica
            (target_ongoing, default max_batch: a replica is busy once it holds a full batch), adding replicas
            after upscale_delay_s above the target and removing them after downscale_delay_s below it.
        max_batch, max_queue: the replica's scheduler limits: Ray sends a replica at most max_batch + max_queue
            requests at once and holds the rest at the proxy, so the scheduler's own 429 stays for overload.
        request_timeout: the longest a request may run: a replica being stopped waits that long (plus 5 s) for
            its in-flight requests (streams included) before it is killed.
        replica_cpus, replica_gpus: the CPUs and GPUs Ray reserves for each replica (a fraction packs several on
            one core or GPU); a replica runs as many onnxruntime threads as its CPUs.
    """
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise ValueError("--replicas is a fixed count; --min-replicas / --max-replicas autoscale: give one or the "
                         "other")
    opts = {"max_ongoing_requests": max_batch + max_queue,
            "graceful_shutdown_timeout_s": request_timeout + 5.0, "graceful_shutdown_wait_loop_s": 1.0,
            "health_check_period_s": 5.0,
            "ray_actor_options": {"num_cpus": replica_cpus, **({"num_gpus": replica_gpus} if replica_gpus else {})}}
    if min_replicas is None and max_replicas is None:
        opts["num_replicas"] = 1 if replicas is None else replicas
        return opts
    low = 1 if min_replicas is None else min_replicas
    high = max(low, 1) if max_replicas is None else max_replicas
    if low > high:
        raise ValueError(f"--min-replicas {low} is more than --max-replicas {high}; give min <= max")
    opts["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                  "target_ongoing_requests": float(target_ongoing or max_batch),
                                  "upscale_delay_s": upscale_delay_s, "downscale_delay_s": downscale_delay_s,
                                  "look_back_period_s": max(2.0, upscale_delay_s)}
    return opts


def capacity_problem(options: dict, nodes: list[dict], can_grow: bool) -> tuple[str | None, str | None]:
    """(error, warning) for `options`' replicas on a cluster of `nodes` (each node's resources, as ray.nodes()
    reports them: {"CPU": 2.0, "GPU": 1.0, ...}): how many replicas the nodes hold, one node's share at a time.

    Fewer than the fixed or minimum count is an error where the cluster cannot grow (this machine's local
    cluster: serve.run would wait forever), a warning where it may (an autoscaler, KubeRay, another `ray start`);
    fewer than autoscaling's maximum is a warning."""
    actor = options.get("ray_actor_options", {})
    auto = options.get("autoscaling_config")
    low = auto["min_replicas"] if auto else options["num_replicas"]
    high = auto["max_replicas"] if auto else low
    need = {r: actor.get(k) or 0 for r, k in (("CPU", "num_cpus"), ("GPU", "num_gpus"))}
    fits = sum(min((int(node.get(r, 0) / n + 1e-9) for r, n in need.items() if n), default=high) for node in nodes)
    flags = " and ".join(f"--replica-{r.lower()}s {n:g}" for r, n in need.items() if n)
    where = "this machine's local cluster" if not can_grow else "the cluster as it is now"
    sizes = ", ".join(f"{node.get('CPU', 0):g} CPUs" for node in nodes)
    if need["GPU"] and not any(node.get("GPU") for node in nodes):
        why = (f"{where} has no GPU, and each replica asks for {need['GPU']:g} (--provider cuda / --backend "
               f"tensorrt reserve 1): serve on the CPU, or join a cluster with GPUs (--ray-address)")
    elif fits < max(low, 1):  # none at all: nothing would ever answer
        why = (f"{where} holds {fits} replica{'s' if fits != 1 else ''} of {flags} (its nodes: {sizes}), not the "
               f"{max(low, 1)} asked for: lower the replica count or the reservation per replica")
    elif fits < high:
        return None, (f"{where} holds {fits} of the {high} replicas autoscaling may ask for"
                      f"{'; Ray waits for more nodes beyond that' if can_grow else ''}")
    else:
        return None, None
    return (None, f"{why}, or add nodes; Ray waits until it can place them") if can_grow else (why, None)


def config_of(args: ReplicaArgs, options: dict, host: str, port: int) -> dict:
    """A Ray Serve config (`serve deploy` / `serve run` take it as YAML) running build_app with `args` and the
    deployment `options` (no API key: set $NANOGPT_DEPLOY_API_KEY on every node, or a runtime_env, by hand)."""
    args_dict = {k: v for k, v in args.model_dump().items() if v != ReplicaArgs.model_fields[k].default or k == "model"}
    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args_dict,
                              "deployments": [{"name": APP_NAME, **options}]}]}


def write_config(path: str | os.PathLike, config: dict) -> None:
    """`config` as YAML at `path`, written atomically (a crash leaves the old file or none)."""
    import yaml

    from ..files import atomic_write_text

    header = (f"# Ray Serve config for nanogpt-deploy, written by `nanogpt-deploy serve --ray --write-config`.\n"
              f"# Model paths must exist on every node. Run: serve deploy {Path(path).name}  (or serve run)\n")
    atomic_write_text(path, header + yaml.safe_dump(config, sort_keys=False))
