"""`nanogpt-deploy serve`'s startup checks (runtime/cli/serve.py), before any model is opened or fastapi imported:
a bind beyond loopback needs an API key, and --max-batch must fit a TensorRT engine."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from runtime.cli import main
from runtime.cli.serve import check_bind, is_loopback


def test_non_loopback_bind_needs_api_key(monkeypatch, capsys):
    monkeypatch.delenv("NANOGPT_DEPLOY_API_KEY", raising=False)
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.5", "example.com"]))
    # refused before the model is even opened (a missing model would be the error otherwise)
    assert main(["serve", "no/such/model", "--host", "0.0.0.0"]) == 1
    assert "refusing to bind 0.0.0.0" in capsys.readouterr().err
    check_bind("0.0.0.0", "a-key")  # with a key it may


def test_max_batch_above_a_tensorrt_engines_is_refused_at_startup():
    pytest.importorskip("fastapi")
    from runtime.serve.server import check_engine_batch  # load_app's check, for the plain server and Ray replicas

    engine = SimpleNamespace(meta=SimpleNamespace(max_batch=8), path="out/m.engine")
    check_engine_batch((engine, None), 8)
    check_engine_batch((SimpleNamespace(), None), 64)  # onnxruntime / torch: no engine limit
    with pytest.raises(ValueError, match="--max-batch 16 exceeds the 8 rows out/m.engine was built for; serve with "
                                         "--max-batch 8, or rebuild the engine with --max-batch 16"):
        check_engine_batch((engine, None), 16)


def test_startup_errors_come_before_the_serving_line(tmp_path, capsys):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    try:  # the port is checked before the model loads: a missing model is not the error here
        assert main(["serve", str(tmp_path / "no-model"), "--port", port]) == 1
    finally:
        busy.close()
    out, err = capsys.readouterr()
    assert "serving" not in out and f"cannot listen on 127.0.0.1:{port}: the port is already in use" in err, err
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = str(free.getsockname()[1])
    free.close()
    assert main(["serve", str(tmp_path / "no-model"), "--port", port]) == 1  # an unreadable model
    out, err = capsys.readouterr()
    assert "serving" not in out and "no-model" in err, (out, err)
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    assert main(["serve", str(tmp_path / "no-model"), "--port", port, "--chat-template",
                 str(tmp_path / "bad.jinja")]) == 1
    out, err = capsys.readouterr()
    assert "serving" not in out and "chat template" in err and "bad.jinja" in err, err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("nanogpt-deploy ")


def test_ray_flags_are_checked_before_ray_is_needed(capsys):
    """Replica counts that cannot both hold, or Ray's flags without --ray: one-line errors, with or without ray."""
    cases = [(["--ray", "--replicas", "2", "--max-replicas", "3"], "--replicas is a fixed count, --min-replicas / "
                                                                   "--max-replicas autoscale; give one or the other"),
             (["--ray", "--min-replicas", "4", "--max-replicas", "2"], "--min-replicas 4 is more than --max-replicas "
                                                                       "2; give min <= max"),
             (["--replicas", "2"], "--replicas goes with --ray; add --ray"),
             (["--replica-cpus", "2"], "--replica-cpus goes with --ray; add --ray"),
             (["--ray", "--replicas", "2", "--upscale-delay", "1"], "--upscale-delay tunes autoscaling; add "
                                                                    "--min-replicas / --max-replicas")]
    for flags, message in cases:
        assert main(["serve", "no/such/model", *flags]) == 1
        assert message in capsys.readouterr().err


def test_ray_missing_names_the_extra(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # an import of ray raises ImportError, as without the extra
    assert main(["serve", str(tmp_path), "--ray", "--replicas", "2"]) == 1
    assert "--ray needs ray, which is not installed; pip install 'nanogpt-deploy[ray]'" in capsys.readouterr().err


def test_write_config_is_a_ray_serve_config(tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    out = tmp_path / "conf" / "ray.yaml"
    assert main(["serve", str(tmp_path), "--ray", "--min-replicas", "1", "--max-replicas", "4", "--threads", "1",
                 "--upscale-delay", "2", "--write-config", str(out)]) == 0
    assert f"serve deploy {out}" in capsys.readouterr().out
    config = yaml.safe_load(out.read_text())
    [app] = config["applications"]
    assert app["import_path"] == "runtime.serve.ray_app:build_app" and app["route_prefix"] == "/"
    assert app["args"] == {"model": str(tmp_path.resolve()), "threads": 1}  # defaults left to ReplicaArgs
    [dep] = app["deployments"]
    assert dep["autoscaling_config"]["min_replicas"] == 1 and dep["autoscaling_config"]["max_replicas"] == 4
    assert dep["autoscaling_config"]["target_ongoing_requests"] == 16 and dep["max_ongoing_requests"] == 16 + 64
    assert dep["graceful_shutdown_timeout_s"] == 65 and "num_replicas" not in dep
    assert not list(out.parent.glob(".*.tmp")), "the atomic write left its temporary file"
    try:  # Ray's own schema, where ray is installed
        from ray.serve.schema import ServeDeploySchema
    except ImportError:
        return
    ServeDeploySchema.model_validate(config)


def test_a_config_written_with_a_key_makes_every_replica_require_one(tmp_path, monkeypatch, capsys):
    """--write-config never writes the key; a config written where one was set says so, and a replica on a node
    missing $NANOGPT_DEPLOY_API_KEY then refuses to start instead of serving an exposed address to anyone."""
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("pydantic")
    from runtime.serve.ray_config import ReplicaArgs, api_key_of

    monkeypatch.setenv("NANOGPT_DEPLOY_API_KEY", "s3cret")
    out = tmp_path / "ray.yaml"
    assert main(["serve", str(tmp_path), "--ray", "--host", "0.0.0.0", "--write-config", str(out)]) == 0
    text = out.read_text()
    assert "s3cret" not in text
    args = ReplicaArgs(**yaml.safe_load(text)["applications"][0]["args"])
    assert args.require_api_key and api_key_of(args) == "s3cret"
    monkeypatch.delenv("NANOGPT_DEPLOY_API_KEY")
    with pytest.raises(RuntimeError, match=r"launched with an API key, and \$NANOGPT_DEPLOY_API_KEY is not set"):
        api_key_of(args)
    assert api_key_of(ReplicaArgs(model="m")) is None  # written without a key: loopback only (check_bind)


def test_ray_replicas_reserve_gpus_for_cuda_and_chat_stop_needs_a_template(tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    pydantic = pytest.importorskip("pydantic")
    from runtime.serve.ray_config import ReplicaArgs

    out = tmp_path / "ray.yaml"
    for flags, gpus in ([], None), (["--provider", "cuda"], 1), (["--backend", "tensorrt", "--replica-gpus", "0.5"], 0.5):
        assert main(["serve", str(tmp_path), "--ray", *flags, "--write-config", str(out)]) == 0
        [dep] = yaml.safe_load(out.read_text())["applications"][0]["deployments"]
        assert dep["ray_actor_options"].get("num_gpus") == gpus, (flags, dep)
    assert main(["serve", str(tmp_path), "--ray", "--chat-stop", "</s>", "--write-config", str(out)]) == 1
    assert "--chat-stop goes with --chat-template" in capsys.readouterr().err
    with pytest.raises(pydantic.ValidationError, match="--chat-stop goes with --chat-template"):
        ReplicaArgs(model="m", chat_stop=["</s>"])  # a hand-written config's args: refused before any replica starts


def test_replicas_that_cannot_fit_the_cluster_are_named():
    """serve.run would wait forever for replicas no node can hold: capacity_problem says so first, counting what
    each node holds (two 1-CPU nodes hold no replica of 2 CPUs); an error on this machine's local cluster, a
    warning on a cluster that may grow."""
    pytest.importorskip("pydantic")
    from runtime.serve.ray_config import capacity_problem
    from runtime.serve.ray_config import deployment_options as opts

    two_cpus, two_nodes = [{"CPU": 2.0}], [{"CPU": 1.0}, {"CPU": 1.0}]
    assert capacity_problem(opts(2), two_cpus, False) == (None, None)
    assert capacity_problem(opts(4, replica_cpus=0.5), two_nodes, False) == (None, None)
    error, _ = capacity_problem(opts(3), two_cpus, False)
    assert error == ("this machine's local cluster holds 2 replicas of --replica-cpus 1 (its nodes: 2 CPUs), not the "
                     "3 asked for: lower the replica count or the reservation per replica"), error
    error, _ = capacity_problem(opts(1, replica_cpus=2), two_nodes, False)
    assert error.startswith("this machine's local cluster holds 0 replicas of --replica-cpus 2 (its nodes: 1 CPUs, "
                            "1 CPUs)"), error
    error, _ = capacity_problem(opts(min_replicas=0, max_replicas=2, replica_gpus=1), two_cpus, False)
    assert error.startswith("this machine's local cluster has no GPU, and each replica asks for 1 (--provider cuda"), \
        error
    _, warning = capacity_problem(opts(min_replicas=1, max_replicas=4), two_cpus, False)
    assert warning == "this machine's local cluster holds 2 of the 4 replicas autoscaling may ask for", warning
    error, warning = capacity_problem(opts(3), two_cpus, True)
    assert error is None and warning.endswith("or add nodes; Ray waits until it can place them"), warning


def test_ray_paths_a_replica_could_not_resolve_are_refused(tmp_path, capsys, monkeypatch):
    """A replica runs in Ray's working folder: a relative path missing here would name nothing there."""
    pytest.importorskip("pydantic")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    assert main(["serve", "m", "--ray", "--chat-template", "nope.jinja", "--write-config", "c.yaml"]) == 1
    assert ("--chat-template nope.jinja does not exist here; give the absolute path it has on every node"
            in capsys.readouterr().err)
    assert not (tmp_path / "c.yaml").exists()
