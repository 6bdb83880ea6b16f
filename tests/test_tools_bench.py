"""`nanogpt-deploy bench` on the tiny export: the JSON's fields and sane (not timed) numbers, the plot, skip notes,
cases past block_size, and a torch-free parent when torch is not requested."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from runtime import cli
from runtime.tools.bench import BenchError, Case, find_targets


def bench_json(capsys, *argv) -> dict:
    rc = cli.main(["bench", *map(str, argv), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def test_json_has_every_field_with_sane_numbers_and_writes_the_plot(tiny_onnx_dir, tmp_path, capsys):
    png = tmp_path / "plots" / "bench.png"
    report = bench_json(capsys, tiny_onnx_dir, "--backends", "onnxruntime", "--providers", "cpu", "--prompt-len", "4,9",
                        "--new-tokens", "6", "--batch", "1,2", "--warmup", "1", "--repeats", "2", "--threads", "1",
                        "--plot", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["plot"] == str(png)
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert report["settings"]["repeats"] == 2 and report["failed"] == []
    [target] = report["results"]
    assert target["label"] == "onnxruntime cpu fp32" and target["provider_name"] == "CPUExecutionProvider"
    assert 0 < target["rss_after_load_mb"] <= target["peak_rss_mb"] < 4096
    assert {(c["case"]["batch"], c["case"]["prompt"]) for c in target["cases"]} == {(1, 4), (1, 9), (2, 4), (2, 9)}
    for c in target["cases"]:
        assert 0 < c["prefill_ms"] <= c["ttft_ms"], c
        assert c["decode_tok_s"] > 0 and c["e2e_tok_s"] > 0
        assert 0 < c["latency_p50_ms"] <= c["latency_p95_ms"], c
        assert len(c["step_latency_ms"]) == 6 - 1  # one per token after the first


def test_table_and_summary_line(tiny_onnx_dir, capsys):
    rc = cli.main(["bench", str(tiny_onnx_dir), "--backends", "onnxruntime", "--providers", "cpu", "--prompt-len", "4",
                   "--new-tokens", "4", "--repeats", "1", "--warmup", "0"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "decode tok/s" in out.out and "onnxruntime cpu fp32" in out.out
    assert "fastest decode" in out.err.splitlines()[-1]
    assert "1/1" in out.err  # the progress bar reached the end


def test_case_past_block_size_is_skipped_not_run(tiny_onnx_dir, capsys):
    report = bench_json(capsys, tiny_onnx_dir, "--backends", "onnxruntime", "--providers", "cpu", "--prompt-len", "120",
                        "--new-tokens", "16", "--repeats", "1", "--warmup", "0")
    [case] = report["results"][0]["cases"]
    assert "exceeds block_size 128" in case["skipped"]


@pytest.mark.parametrize("providers",
                         [None, ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]],
                         ids=["installed", "cpu-only", "cuda"])
def test_absent_backends_are_skipped_with_a_note(tiny_onnx_dir, monkeypatch, providers):
    """What runs follows the providers onnxruntime has: this machine's (installed), then both kinds simulated."""
    import runtime.tools.bench as bench

    if providers is not None:
        monkeypatch.setattr(bench, "_ort_providers", lambda: list(providers))
    cuda = "CUDAExecutionProvider" in bench._ort_providers()
    targets, notes = find_targets([str(tiny_onnx_dir)], ("onnxruntime", "tensorrt"), ("cpu", "cuda"))
    assert [t.label for t in targets] == ["onnxruntime cpu fp32"] + (["onnxruntime cuda fp32"] if cuda else [])
    assert any(n.startswith("tensorrt: skipped") for n in notes), notes
    cuda_skipped = [n for n in notes if n.startswith("onnxruntime cuda: skipped")]
    assert len(cuda_skipped) == (0 if cuda else 1), notes


def test_torch_target_runs_the_checkpoint_of_the_fp32_export(tiny_onnx_dir):
    pytest.importorskip("torch")
    targets, _ = find_targets([str(tiny_onnx_dir)], ("torch", "onnxruntime"), ("cpu",))
    assert [t.label for t in targets] == ["torch cpu fp32", "onnxruntime cpu fp32"]


def test_bad_inputs_say_what_to_do(tmp_path, capsys):
    with pytest.raises(BenchError, match="neither an exported folder"):
        find_targets([str(tmp_path / "missing")])
    with pytest.raises(BenchError, match="unknown backend 'tensorflow'"):
        find_targets([str(tmp_path)], ("tensorflow",))
    assert cli.main(["bench", str(tmp_path / "missing")]) == 1
    assert "export one with" in capsys.readouterr().err
    assert Case(8, 32, 128).label == "B8 P32 N128"


def test_parent_stays_torch_free_without_the_torch_backend(tiny_onnx_dir):
    code = (f"import sys; from runtime import cli; rc = cli.main(['bench', {str(tiny_onnx_dir)!r}, '--backends', "
            f"'onnxruntime', '--providers', 'cpu', '--prompt-len', '4', '--new-tokens', '3', '--repeats', '1', "
            f"'--warmup', '0', '--json']); assert rc == 0; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_bad_plot_path_is_refused_before_any_timing(tiny_onnx_dir, tmp_path, capsys, monkeypatch):
    import runtime.tools.bench

    monkeypatch.setattr(runtime.tools.bench, "run_bench", lambda *a, **k: pytest.fail("timed before checking --plot"))
    (tmp_path / "file").write_text("")
    bad = [(tmp_path / "x.foo", "'.foo' is not an image format matplotlib writes; end the name in .png"),
           (tmp_path / "file" / "x.png", "is not a folder"), (tmp_path, "is a folder; give a file name"),
           (tmp_path / "bench", "a name without a suffix is not an image format")]
    if os.path.isdir("/proc"):
        bad.append(("/proc/x.png", "cannot write in /proc"))
    for path, message in bad:
        assert cli.main(["bench", str(tiny_onnx_dir), "--backends", "onnxruntime", "--plot", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: --plot {path}") and message in err, err


def test_a_plot_failing_late_still_prints_the_results(tiny_onnx_dir, tmp_path, capsys, monkeypatch):
    import runtime.tools.bench_report

    def broken(report, path):
        raise ValueError("the backend cannot draw")

    monkeypatch.setattr(runtime.tools.bench_report, "plot_report", broken)
    rc = cli.main(["bench", str(tiny_onnx_dir), "--backends", "onnxruntime", "--providers", "cpu", "--prompt-len", "4",
                   "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--json", "--plot", str(tmp_path / "b.png")])
    out, err = capsys.readouterr()
    assert rc == 1
    assert json.loads(out)["results"][0]["label"] == "onnxruntime cpu fp32"  # the results came out first
    assert "the plot could not be written (ValueError: the backend cannot draw); the results above are complete" in err


def test_a_worker_flooding_stderr_cannot_hang_the_parent(monkeypatch):
    """A worker writing more than a pipe holds to stderr before it finishes its stdout: the parent must not wait on
    stdout while the worker waits on a full stderr pipe."""
    import threading

    import runtime.tools.bench as bench

    flood = ("import sys; sys.stderr.write('x' * 1_000_000 + '\\nworker broke\\n'); sys.stderr.flush(); "
             "print('{\"event\": \"run\"}'); sys.exit(1)")
    popen = subprocess.Popen
    monkeypatch.setattr(bench.subprocess, "Popen", lambda args, **kw: popen([sys.executable, "-c", flood], **kw))
    out = {}
    t = threading.Thread(target=lambda: out.update(bench.run_bench([bench.Target("onnxruntime", "m")], [Case(1, 4, 2)],
                                                                   warmup=0, repeats=1)), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "run_bench hung on a worker's stderr"
    assert [f["error"] for f in out["failed"]] == ["worker broke"] and out["results"] == []


def test_hub_names_are_checkpoints_for_torch_but_a_missing_local_path_is_not(tiny_onnx_dir, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    targets, _ = find_targets(["gpt2", "openai-community/gpt2", str(tiny_onnx_dir)], ("torch", "onnxruntime"), ("cpu",))
    assert [(t.backend, t.model) for t in targets] == [
        ("torch", "gpt2"), ("torch", "openai-community/gpt2"), ("onnxruntime", str(tiny_onnx_dir))]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for typo in ("out/typo", "./typo", "typo.pt"):
        with pytest.raises(BenchError, match="neither an exported folder"):
            find_targets([typo])


def test_results_say_whether_tf32_ran(tiny_onnx_dir, capsys):
    from runtime.cli.bench import tf32_note
    from runtime.cli.verify import tf32_note as verify_note

    report = bench_json(capsys, tiny_onnx_dir, "--backends", "onnxruntime", "--providers", "cpu", "--prompt-len", "4",
                        "--new-tokens", "2", "--repeats", "1", "--warmup", "0")
    assert report["settings"]["tf32"] is False and report["results"][0]["tf32"] is False, report["results"][0]
    def gpu(label, tf32):
        return {"label": label, "target": {"provider": "cuda"}, "provider": "cuda", "tf32": tf32}

    assert tf32_note(report["results"]) == ""  # CPU only: nothing to say
    assert tf32_note([gpu("onnxruntime cuda fp32", False)]) == "; TF32 off"
    assert tf32_note([gpu("onnxruntime cuda fp32", True)]) == "; TF32 on: onnxruntime cuda fp32"
    assert verify_note({"reference": {"label": "onnxruntime cuda fp32", "tf32": True}, "targets": []}) == \
        "; TF32 on: onnxruntime cuda fp32"


@pytest.mark.parametrize("name", ["x.plan", "x.engine", "folder"])
def test_engine_targets_read_the_precision_from_the_sidecar_the_builder_writes(tmp_path, monkeypatch, name):
    """Bench names an engine's sidecar as the builder and backend do (runtime/trt_plan.sidecar_path): x.plan's is
    x.plan.json, not x.engine.json (which once left a .plan engine's precision "?"). No TensorRT needed: the
    sidecar is JSON, and find_targets only asks whether the package is installed."""
    import importlib.util

    from model.config import GPTConfig
    from runtime.artifact import Artifact
    from runtime.trt_plan import ENGINE_NAME, EngineMeta, sidecar_path

    engine = tmp_path / (ENGINE_NAME if name == "folder" else name)
    engine.write_bytes(b"plan")
    EngineMeta(artifact=Artifact(config=GPTConfig.preset("tiny"), precision="fp16"), tensorrt_version="10.9.0.34",
               gpu_name="GPU", compute_capability="9.0", profiles=[], max_batch=1,
               max_seq=8).write_json(sidecar_path(engine))
    assert sidecar_path(engine).name == engine.name + ".json"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "tensorrt" else find_spec(n, *a))
    targets, notes = find_targets([str(tmp_path if name == "folder" else engine)], ("tensorrt",), ("cuda",))
    assert [(t.backend, t.precision) for t in targets] == [("tensorrt", "fp16")], notes


def test_table_keeps_its_columns_aligned_around_skipped_cases():
    from runtime.tools.bench_report import format_table

    case = lambda prompt, **m: {"case": {"batch": 1, "prompt": prompt, "new": 16}, **m}  # noqa: E731
    report = {"results": [{"label": "onnxruntime cpu fp32", "peak_rss_mb": 812.0, "cases": [
        case(32, ttft_ms=12.5, decode_tok_s=1234.5, latency_p50_ms=0.81, latency_p95_ms=0.9, e2e_tok_s=1100.0),
        case(512, skipped="prompt 512 + 16 new tokens exceeds block_size 256"),
        case(64, ttft_ms=20.25, decode_tok_s=999.0, latency_p50_ms=1.0, latency_p95_ms=1.2, e2e_tok_s=900.0)]}]}
    head, ok1, skip, ok2 = format_table(report).splitlines()
    assert skip.startswith("onnxruntime cpu fp32      1     512   16  skipped: prompt 512"), skip
    for line in (ok1, skip, ok2):  # the key columns end where the header's do
        assert line[:head.index("new") + 3].rstrip()[-2:] == "16", (head, line)
    assert len(ok1) == len(ok2) and ok1.index("1234.5") + 6 == ok2.index("999.0") + 5
