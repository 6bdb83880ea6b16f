"""`nanogpt-deploy serve`'s startup checks (runtime/cli/serve.py), before any model is opened or fastapi imported:
a bind beyond loopback needs an API key, and --max-batch must fit a TensorRT engine."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from runtime.cli import main
from runtime.cli.serve import check_bind, check_engine_batch, is_loopback


def test_non_loopback_bind_needs_api_key(monkeypatch, capsys):
    monkeypatch.delenv("NANOGPT_DEPLOY_API_KEY", raising=False)
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.5", "example.com"]))
    # refused before the model is even opened (a missing model would be the error otherwise)
    assert main(["serve", "no/such/model", "--host", "0.0.0.0"]) == 1
    assert "refusing to bind 0.0.0.0" in capsys.readouterr().err
    check_bind("0.0.0.0", "a-key")  # with a key it may


def test_max_batch_above_a_tensorrt_engines_is_refused_at_startup():
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
