"""`nanogpt-deploy serve MODEL`: an OpenAI-compatible HTTP server (runtime/serve/server.py) on loopback by default.

    nanogpt-deploy serve out/tiny                                     # http://127.0.0.1:8000/v1
    NANOGPT_DEPLOY_API_KEY=secret nanogpt-deploy serve out/demo --host 0.0.0.0 --max-batch 32

    nanogpt-deploy serve out/tiny --ray --min-replicas 1 --max-replicas 4   # Ray Serve replicas, autoscaled
    nanogpt-deploy serve out/tiny --ray --replicas 2 --write-config ray.yaml   # for `serve deploy ray.yaml`

Binding any address other than loopback needs an API key (--api-key, or the environment variable
NANOGPT_DEPLOY_API_KEY, which keeps it out of `ps`); clients then send `Authorization: Bearer KEY`.
Needs the `serve` extra: pip install 'nanogpt-deploy[serve]'; --ray the `ray` extra (runtime/serve/ray_app.py).
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import signal
import socket
import time
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
    g = p.add_argument_group("Ray Serve (--ray; the `ray` extra)")
    g.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve replicas, each one model with its own batching scheduler, behind Ray's "
                        "HTTP proxy on --host/--port; a local cluster unless --ray-address")
    g.add_argument("--replicas", type=int_in(1, 1024, "a replica count"), default=None,
                   help="a fixed number of replicas (default: 1)")
    g.add_argument("--min-replicas", type=int_in(0, 1024, "a replica count"), default=None,
                   help="autoscale between --min-replicas and --max-replicas on ongoing requests per replica")
    g.add_argument("--max-replicas", type=int_in(1, 1024, "a replica count"), default=None, help="see --min-replicas")
    g.add_argument("--target-ongoing", type=float_in(0, 1 << 16, "a request count", above=True), default=None,
                   help="autoscaling: ongoing requests per replica to aim for (default: --max-batch)")
    g.add_argument("--upscale-delay", type=float_in(0, 3600, "a delay in seconds"), default=None,
                   help="autoscaling: seconds above the target before replicas are added (default: 10)")
    g.add_argument("--downscale-delay", type=float_in(0, 3600, "a delay in seconds"), default=None,
                   help="autoscaling: seconds below the target before replicas are removed (default: 60)")
    g.add_argument("--replica-cpus", type=float_in(0, 1024, "a CPU count", above=True), default=None,
                   help="CPUs Ray reserves per replica, and its onnxruntime threads (default: 1; fractions pack "
                        "replicas onto fewer cores)")
    g.add_argument("--replica-gpus", type=float_in(0, 64, "a GPU count"), default=None,
                   help="GPUs Ray reserves per replica (default: 1 for --provider cuda and --backend tensorrt, "
                        "else 0)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (`auto`: the one `ray start` runs here; or HOST:6379) instead of "
                        "starting a local one; MODEL must exist at the same path on every node")
    g.add_argument("--write-config", default=None, metavar="FILE",
                   help="write a Ray Serve config YAML for `serve deploy FILE` / `serve run FILE` and exit")


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


RAY_FLAGS = ("replicas", "min_replicas", "max_replicas", "ray_address", "write_config", "target_ongoing",
             "upscale_delay", "downscale_delay", "replica_cpus", "replica_gpus")
AUTOSCALING_FLAGS = ("target_ongoing", "upscale_delay", "downscale_delay")


def check_ray_flags(args) -> None:
    """Ray's flags go with --ray, and the replica counts must make sense (before Ray is imported)."""
    given = [f"--{name.replace('_', '-')}" for name in RAY_FLAGS if getattr(args, name, None) is not None]
    if given and not args.ray:
        raise ValueError(f"{', '.join(given)} {'goes' if len(given) == 1 else 'go'} with --ray; add --ray (and "
                         f"pip install 'nanogpt-deploy[ray]')")
    if args.replicas is not None and (args.min_replicas is not None or args.max_replicas is not None):
        raise ValueError("--replicas is a fixed count, --min-replicas / --max-replicas autoscale; give one or the "
                         "other")
    autoscaling = [f"--{n.replace('_', '-')}" for n in AUTOSCALING_FLAGS if getattr(args, n, None) is not None]
    if autoscaling and args.min_replicas is None and args.max_replicas is None:
        raise ValueError(f"{', '.join(autoscaling)} tune{'s' if len(autoscaling) == 1 else ''} autoscaling; add "
                         f"--min-replicas / --max-replicas (--replicas is a fixed count)")
    if args.min_replicas is not None and args.max_replicas is not None and args.min_replicas > args.max_replicas:
        raise ValueError(f"--min-replicas {args.min_replicas} is more than --max-replicas {args.max_replicas}; "
                         f"give min <= max")


def run(args) -> int:
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(args.host, api_key)  # before anything slow: a refused bind costs nothing
    check_limits(args)
    check_ray_flags(args)
    if args.ray:
        return run_ray(args, api_key)
    try:
        import uvicorn

        from ..serve.connections import uvicorn_config
        from ..serve.logs import configure_logging
        from ..serve.ray_config import check_chat_flags
        from ..serve.server import load_app
    except ImportError as e:
        raise RuntimeError(f"serve needs {e.name}, which is not installed; "
                           "pip install 'nanogpt-deploy[serve]'") from None
    from ..generation import draft_for

    check_chat_flags(args.chat_template, args.chat_stop)
    rargs = replica_args(args, api_key)
    # every startup error comes before the "serving" line: the port, then the template, tokenizer and model
    sock = bind_socket(args.host, args.port)
    try:
        app, backend, draft, name = load_app(rargs, api_key)
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


def replica_args(args, api_key: str | None, must_exist: bool = False):
    """serve's flags as each Ray replica takes them (ReplicaArgs); paths made absolute, as a replica's working
    folder is Ray's, not this one. must_exist: a path missing here is refused (a replica could not resolve a
    relative one at all), but an absolute one may exist on the cluster's nodes only."""
    from ..serve.ray_config import ReplicaArgs

    def absolute(path, flag):
        if not path or (flag == "MODEL" and args.backend == "torch" and not Path(path).exists()):
            return path  # a hub name or random:NAME for the torch backend
        if must_exist and not Path(path).exists() and not Path(path).is_absolute():
            raise FileNotFoundError(f"{flag} {path} does not exist here; give the absolute path it has on every "
                                    f"node (replicas resolve paths from Ray's working folder, not this one)")
        return os.path.abspath(path)  # links kept: the model's name is MODEL's folder name

    return ReplicaArgs(model=absolute(args.model, "MODEL"), backend=args.backend, provider=args.provider, decode=args.decode,
                       threads=args.threads, verify_weights=not args.no_verify_weights, tf32=args.tf32,
                       draft=absolute(args.draft, "--draft"), speculate=args.speculate,
                       tokenizer_file=absolute(args.tokenizer_file, "--tokenizer-file"), model_name=args.model_name,
                       max_batch=args.max_batch, max_queue=args.max_queue, batch_window_ms=args.batch_window_ms,
                       batching=args.batching, request_timeout=args.request_timeout,
                       max_body_bytes=args.max_body_bytes, chat_template=absolute(args.chat_template, "--chat-template"),
                       chat_stop=args.chat_stop, log_format=args.log_format,
                       require_api_key=bool(api_key))


def run_ray(args, api_key: str | None) -> int:
    """serve --ray: the app on Ray Serve replicas (runtime/serve/ray_app.py), or with --write-config its config
    file. A local cluster lives as long as this process; Ctrl-C / SIGTERM drain the replicas' in-flight requests
    first. On a cluster given by --ray-address, the app is removed at the end and the cluster left running."""
    try:
        from ..serve import ray_config as rc
        from ..serve.chat import ChatTemplate
    except ImportError as e:
        raise RuntimeError(f"serve needs {e.name}, which is not installed; pip install 'nanogpt-deploy[serve]'") \
            from None
    rc.check_chat_flags(args.chat_template, args.chat_stop)
    local = args.ray_address is None and not args.write_config
    gpus = args.replica_gpus
    if gpus is None:
        gpus = 1.0 if args.backend == "tensorrt" or args.provider == "cuda" else 0.0
    options = rc.deployment_options(
        args.replicas, args.min_replicas, args.max_replicas, max_batch=args.max_batch, max_queue=args.max_queue,
        request_timeout=args.request_timeout, target_ongoing=args.target_ongoing,
        upscale_delay_s=10.0 if args.upscale_delay is None else args.upscale_delay,
        downscale_delay_s=60.0 if args.downscale_delay is None else args.downscale_delay,
        replica_cpus=args.replica_cpus or 1.0, replica_gpus=gpus)
    rargs = replica_args(args, api_key, must_exist=True)
    if local and rargs.chat_template:  # the replicas' first check, here in seconds instead of after Ray's start
        ChatTemplate.from_file(rargs.chat_template, rargs.chat_stop)
    if args.write_config:
        try:
            rc.write_config(args.write_config, rc.config_of(rargs, options, args.host, args.port))
        except ImportError as e:  # pyyaml comes with ray
            raise RuntimeError(f"--write-config needs {e.name}, which is not installed; "
                               f"pip install 'nanogpt-deploy[ray]'") from None
        print(f"wrote {args.write_config}: run it with `serve deploy {args.write_config}` on a cluster (`ray start "
              f"--head` first) or `serve run {args.write_config}`; set {API_KEY_ENV} on every node"
              f"{' (this config requires it)' if api_key else ' for a key'}")
        return 0
    try:
        import ray
        from ray import serve

        from ..serve.ray_app import bind_app
    except ImportError as e:
        raise RuntimeError(f"--ray needs {e.name}, which is not installed; pip install 'nanogpt-deploy[ray]'") \
            from None
    if local:
        if not Path(rargs.model).exists() and args.backend != "torch":
            raise FileNotFoundError(f"{args.model} does not exist; give an exported folder or its model.onnx")
        bind_socket(args.host, args.port).close()  # a busy port is an error now, not inside Ray's proxy

    def stop(signum, frame):
        raise KeyboardInterrupt

    # from here on SIGTERM (Kubernetes, systemd) stops as Ctrl-C does, through the cleanup below, also while Ray
    # starts (its own handler would kill the process and leave a half-deployed app on a shared cluster)
    signal.signal(signal.SIGTERM, stop)
    deployed = False
    try:
        if local:
            # the replicas import the same runtime package as this process (a source checkout included)
            root = str(Path(__file__).resolve().parents[2])
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            # address="local": always a new cluster of this process; a bare ray.init() would join a cluster this
            # node already runs (`ray start --head`, RAY_ADDRESS), whose Serve apps the shutdown below would remove
            ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
        else:
            ray.init(address=args.ray_address)
        signal.signal(signal.SIGTERM, stop)  # again: ray.init installs a handler of its own, which aborts
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        error, warning = rc.capacity_problem(options, nodes, can_grow=not local)
        if error:  # serve.run would wait forever for replicas that cannot be placed
            raise ValueError(error)
        if warning:
            print(f"warning: {warning}", flush=True)
        if not local:
            check_shared_cluster(serve, rc.APP_NAME, args.host, args.port, api_key)
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            deployed = True  # from here on, a failed or interrupted start is removed from the cluster too
            serve.run(bind_app(rargs, options, api_key), name=rc.APP_NAME, route_prefix="/")
        except RuntimeError as e:
            raise RuntimeError(f"the Ray Serve application did not start: {replica_error(serve, rc.APP_NAME, e)} "
                               f"(the replicas' logs: /tmp/ray/session_latest/logs/serve/ on each node)") from None
        scale = (f"{options['num_replicas']} replica{'s' if options['num_replicas'] != 1 else ''}"
                 if "num_replicas" in options else
                 "{min_replicas}..{max_replicas} replicas, autoscaled at {target_ongoing_requests:g} ongoing "
                 "requests each".format(**options["autoscaling_config"]))
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving {args.model_name or rc.model_name_of(rargs.model)!r} on http://{host}:{args.port}/v1 "
              f"[Ray Serve, {scale}, {'local cluster' if local else args.ray_address}] max batch {args.max_batch} "
              f"({args.batching}) per replica{', API key required' if api_key else ''}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print(f"stopping: the replicas finish their in-flight requests (up to "
                  f"{options['graceful_shutdown_timeout_s']:g} s)", flush=True)
        return 0
    except KeyboardInterrupt:
        print("interrupted before serving; removing what was started", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the drain ends the process
        if deployed:
            serve.delete(rc.APP_NAME)  # waits for the replicas' graceful shutdown
        if local:
            serve.shutdown()
        ray.shutdown()


def check_shared_cluster(serve, app: str, host: str, port: int, api_key: str | None) -> None:
    """On a cluster given by --ray-address: Serve already running there keeps its own proxy address (serve.start
    ignores --host/--port then), and an app of the same name would be replaced, then removed at our exit."""
    try:
        apps = serve.status().applications
    except Exception:  # no Serve on the cluster yet: serve.start below starts it on --host/--port
        return
    if app in apps:
        raise ValueError(f"an application named {app!r} already runs on this cluster (`serve status`); remove it "
                         f"first (`serve shutdown`, or serve.delete({app!r})), or serve it from there")
    try:
        from ray.serve.context import _get_global_client  # Ray 2.x; no public call gives the proxy's address

        http = _get_global_client().get_serve_details().get("http_options", {})
    except Exception:
        return
    have_host, have_port = http.get("host"), http.get("port")
    if (have_host, have_port) != (host, port):
        raise ValueError(f"Serve already runs on this cluster with its proxy on {have_host}:{have_port}, not "
                         f"{host}:{port} (Serve keeps the address it started with); give --host {have_host} --port "
                         f"{have_port}{' and an API key' if not is_loopback(str(have_host)) and not api_key else ''}, "
                         f"or `serve shutdown` first")


def replica_error(serve, app: str, e: Exception) -> str:
    """Why the app did not start, from Serve's status of its deployment (the replica's exception, last line)."""
    try:
        message = serve.status().applications[app].deployments[app].message
        last = [ln.strip() for ln in message.strip().splitlines() if ln.strip()][-1]
        return last if len(last) < 600 else last[:600] + "..."
    except Exception:
        return str(e).splitlines()[0]
