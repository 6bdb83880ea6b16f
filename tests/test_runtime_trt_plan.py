"""TensorRT plan tests, CPU only, no TensorRT: the pure-Python half of the engine builder and backend.

Profiles, flag validation, the sidecar, compatibility checks, profile selection, the buffer plan and the
errors a user without TensorRT sees. Nothing here builds or runs an engine: that is test_runtime_tensorrt_gpu.py,
which needs TensorRT and a GPU. The engine descriptions below are plain dicts in the form
`describe_engine` returns, standing in for an engine's shape queries.
"""
from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.tensorrt import (
    EngineBuildError,
    check_precision,
    compute_profiles,
    default_timing_cache,
    onnx_sha256,
    resolve_limits,
)
from model.config import GPTConfig
from runtime.artifact import Artifact, ArtifactError
from runtime.backends.tensorrt import TensorRTBackend
from runtime.trt_plan import (
    EngineMeta,
    TensorRTError,
    check_engine,
    check_gpu,
    check_tensorrt_version,
    io_shapes,
    plan_buffers,
    profile_covers,
    resolve_engine,
    sidecar_path,
    suggest_max_seq,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = GPTConfig.preset("tiny")  # n_layer 2, n_head 4, n_embd 64, vocab 512, block 128


def make_meta(config=TINY, max_batch=4, max_seq=32, opt_batch=1, opt_seq=8, precision="fp32", **kw) -> EngineMeta:
    fields = dict(tensorrt_version="10.9.0.34", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                  source_onnx="/models/tiny/model.onnx", source_onnx_sha256="ab" * 32, engine_bytes=1234,
                  build={"opt_batch": opt_batch, "opt_seq": opt_seq})
    fields.update(kw)
    return EngineMeta(artifact=Artifact(config=config, precision=precision),
                      profiles=compute_profiles(config, max_batch, max_seq, opt_batch, opt_seq),
                      max_batch=max_batch, max_seq=max_seq, **fields)


def describe_from_meta(meta: EngineMeta) -> dict:
    """What describe_engine would return for an engine that matches its sidecar exactly."""
    art = meta.artifact
    plan = plan_buffers(art, meta.max_batch, meta.max_seq)
    return {"inputs": list(art.inputs), "outputs": list(art.outputs), "dtypes": plan.dtypes(),
            "profiles": [{n: tuple(tuple(s[k]) for k in ("min", "opt", "max")) for n, s in p["shapes"].items()}
                         for p in meta.profiles]}


# ---- profiles ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_batch,max_seq,opt_batch,opt_seq",
                         [(4, 32, 1, 8), (1, 1, 1, 1), (8, 128, 8, 128), (2, 17, 2, 3)])
def test_profiles_are_consistent_in_every_corner(max_batch, max_seq, opt_batch, opt_seq):
    profiles = compute_profiles(TINY, max_batch, max_seq, opt_batch, opt_seq)
    assert [p["name"] for p in profiles] == ["prefill", "decode"]
    names = Artifact(config=TINY).inputs
    for p in profiles:
        assert sorted(p["shapes"]) == sorted(names)
        for corner in ("min", "opt", "max"):
            s = {n: p["shapes"][n][corner] for n in names}
            B, T = s["input_ids"]
            P = s["past_key_values.0.key"][2]
            assert s["attention_mask"] == [B, P + T], f"{p['name']}.{corner}: mask {s['attention_mask']} != past + seq"
            assert s["position_ids"] == [B, T]
            for n in names[3:]:
                assert s[n] == [B, TINY.n_head, P, TINY.head_dim], f"{p['name']}.{corner}: {n} = {s[n]}"
        for n in names:  # min <= opt <= max, per dimension
            lo, opt, hi = (p["shapes"][n][k] for k in ("min", "opt", "max"))
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), f"{p['name']}.{n}: {lo} {opt} {hi}"
        assert p["shapes"]["past_key_values.0.key"]["min"][2] == 0, "past must start at 0 (the first step)"
        assert p["shapes"]["past_key_values.0.key"]["max"][2] == max_seq - 1
    prefill, decode = profiles
    assert prefill["shapes"]["input_ids"]["opt"] == [opt_batch, opt_seq]
    assert decode["shapes"]["input_ids"]["max"] == [max_batch, 1]


def test_every_request_within_max_seq_is_covered_and_decode_prefers_its_profile():
    meta = make_meta(max_batch=3, max_seq=12, opt_seq=4)
    for batch, seq, past in itertools.product(range(1, 4), range(1, 13), range(0, 12)):
        if past + seq > 12:
            continue
        k = meta.select_profile(batch, seq, past)
        assert profile_covers(meta.profiles[k], io_shapes(TINY, batch, seq, past)), (batch, seq, past, k)
        assert meta.profiles[k]["name"] == ("decode" if seq == 1 else "prefill"), (batch, seq, past)


def test_out_of_profile_requests_say_the_limit_and_the_fix():
    meta = make_meta(config=GPTConfig.preset("gpt2"), max_batch=8, max_seq=512, opt_seq=128)
    with pytest.raises(TensorRTError) as e:
        meta.select_profile(1, 1, 700)
    assert str(e.value) == "engine profile allows past_sequence 0..511, request needs 700; rebuild with --max-seq 1024"
    with pytest.raises(TensorRTError, match=r"allows batch 1\.\.8, request needs 9; rebuild with --max-batch 9"):
        meta.select_profile(9, 1, 0)
    with pytest.raises(TensorRTError,
                       match=r"allows sequence 1\.\.512, request needs 600; rebuild with --max-seq 1024"):
        meta.select_profile(1, 600, 0)
    # inside both boxes, beyond the buffers: past + seq > max_seq
    with pytest.raises(TensorRTError, match=r"up to 512, request needs 500 \+ 20 = 520; rebuild with --max-seq 1024"):
        meta.select_profile(2, 20, 500)
    with pytest.raises(TensorRTError, match="beyond the model's block_size 1024"):
        meta.select_profile(1, 1, 1030)
    assert (suggest_max_seq(513, 1024), suggest_max_seq(100, 1024), suggest_max_seq(900, 1000)) == (1024, 128, 1000)


def test_build_flags_are_validated_against_block_size():
    lim = resolve_limits(TINY)
    assert lim == dict(max_batch=8, max_seq=128, opt_batch=1, opt_seq=128, workspace_gb=4.0)
    assert resolve_limits(TINY, max_seq=16)["opt_seq"] == 16
    with pytest.raises(EngineBuildError,
                       match=r"--max-seq 256 is outside 1\.\.128 \(the model's block_size.*--max-seq 128"):
        resolve_limits(TINY, max_seq=256)
    with pytest.raises(EngineBuildError, match=r"--opt-batch 9 is outside 1\.\.8 \(--max-batch\)"):
        resolve_limits(TINY, opt_batch=9)
    with pytest.raises(EngineBuildError, match=r"--opt-seq 64 is outside 1\.\.32 \(--max-seq\)"):
        resolve_limits(TINY, max_seq=32, opt_seq=64)
    with pytest.raises(EngineBuildError, match="--max-batch 0 must be at least 1"):
        resolve_limits(TINY, max_batch=0)
    with pytest.raises(EngineBuildError, match="--workspace-gb 0 must be positive"):
        resolve_limits(TINY, workspace_gb=0)
    check_precision("fp32"), check_precision("fp16")
    with pytest.raises(EngineBuildError, match="int8 model.onnx cannot become a TensorRT engine.*--dtype fp16"):
        check_precision("int8")


# ---- the sidecar and compatibility -------------------------------------------------------------------

def test_sidecar_round_trip(tmp_path):
    meta = make_meta(precision="fp16", build={"opt_batch": 1, "opt_seq": 8, "workspace_gb": 4.0})
    path = tmp_path / "model.engine.json"
    meta.write_json(path)
    back = EngineMeta.read_json(path)
    assert back == meta and back.precision == "fp16" and back.artifact.kv_dtype == "float16"
    assert sidecar_path(tmp_path / "model.engine") == path
    d = meta.to_dict()
    with pytest.raises(ArtifactError, match="not a nanogpt-deploy engine sidecar"):
        EngineMeta.from_dict({**d, "format": "other/1"})
    with pytest.raises(ArtifactError, match="precision 'fp32' disagrees"):
        EngineMeta.from_dict({**d, "precision": "fp32"})
    broken = {**d, "profiles": [{"name": "prefill", "shapes": {}}]}
    with pytest.raises(ArtifactError, match="damaged engine sidecar: profile 'prefill' lacks"):
        EngineMeta.from_dict(broken)
    with pytest.raises(ArtifactError, match="damaged engine sidecar"):
        EngineMeta.from_dict({k: v for k, v in d.items() if k != "max_seq"})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ArtifactError, match="cannot read engine sidecar.*build-engine"):
        EngineMeta.read_json(tmp_path / "bad.json")


def test_version_and_gpu_mismatch_errors_state_both_and_how_to_rebuild():
    meta = make_meta()
    check_tensorrt_version(meta, "10.9.0.34", "m.engine")
    with pytest.raises(TensorRTError) as e:
        check_tensorrt_version(meta, "10.13.2", "m.engine")
    msg = str(e.value)
    assert "built with TensorRT 10.9.0.34" in msg and "this machine has TensorRT 10.13.2" in msg
    assert "nanogpt-deploy build-engine /models/tiny --out m.engine --max-batch 4 --max-seq 32" in msg

    check_gpu(meta, "NVIDIA H100 80GB HBM3", "9.0", "m.engine")
    with pytest.raises(TensorRTError) as e:
        check_gpu(meta, "NVIDIA A100-SXM4-40GB", "8.0", "m.engine")
    msg = str(e.value)
    assert "built for NVIDIA H100 80GB HBM3 (compute capability 9.0)" in msg
    assert "NVIDIA A100-SXM4-40GB (compute capability 8.0)" in msg and "build-engine" in msg
    with pytest.warns(UserWarning, match="built on NVIDIA H100 80GB HBM3, running on NVIDIA H100 PCIe"):
        check_gpu(meta, "NVIDIA H100 PCIe", "9.0", "m.engine")


def test_engine_description_is_checked_against_sidecar_and_plan():
    meta = make_meta()
    plan = plan_buffers(meta.artifact, meta.max_batch, meta.max_seq)
    good = describe_from_meta(meta)
    check_engine(good, meta, plan, "m.engine")

    renamed = {**good, "outputs": ["logits", "present.0.key", "present.0.value", "present_1_key", "present.1.value"]}
    with pytest.raises(ArtifactError, match=r"missing \['present.1.key'\], unexpected \['present_1_key'\]"):
        check_engine(renamed, meta, plan, "m.engine")
    half = {**good, "dtypes": {**good["dtypes"], "logits": "float16"}}
    with pytest.raises(ArtifactError, match="logits: engine float16, expected float32"):
        check_engine(half, meta, plan, "m.engine")
    with pytest.raises(ArtifactError, match="1 optimization profiles, its sidecar describes 2"):
        check_engine({**good, "profiles": good["profiles"][:1]}, meta, plan, "m.engine")
    other = describe_from_meta(make_meta(max_seq=64))
    with pytest.raises(ArtifactError, match="profile 0 \\(prefill\\) of input_ids"):
        check_engine(other, meta, plan, "m.engine")


# ---- the buffer plan ---------------------------------------------------------------------------------

@pytest.mark.parametrize("precision,itemsize", [("fp32", 4), ("fp16", 2)])
def test_buffer_plan_sizes(precision, itemsize):
    art = Artifact(config=TINY, precision=precision)
    B, S, c = 4, 32, TINY
    plan = plan_buffers(art, B, S)
    assert [(b.name, b.shape, b.dtype) for b in plan.inputs] == [
        ("input_ids", (B, S), "int64"), ("attention_mask", (B, S), "int64"), ("position_ids", (B, S), "int64")]
    assert plan.logits.shape == (B, S, c.vocab_size) and plan.logits.nbytes == B * S * c.vocab_size * itemsize
    assert len(plan.kv) == 2 and all(len(s) == 2 * c.n_layer for s in plan.kv)
    kv_bytes = B * c.n_head * S * c.head_dim * itemsize
    assert all(b.shape == (B, c.n_head, S, c.head_dim) and b.nbytes == kv_bytes for s in plan.kv for b in s)
    assert plan.total_bytes == 3 * B * S * 8 + B * S * c.vocab_size * itemsize + 2 * 2 * c.n_layer * kv_bytes
    # the largest present (P + T = S) and past (P = S - 1) both fit one buffer, packed at its start
    assert int(np.prod(io_shapes(c, B, 1, S - 1)["past_key_values.0.key"])) * itemsize < kv_bytes
    assert int(np.prod((B, c.n_head, S, c.head_dim))) * itemsize == kv_bytes
    assert set(plan.dtypes()) == set(art.inputs) | set(art.outputs)


def test_kv_ping_pong_swaps_addresses_without_copies():
    art = Artifact(config=TINY)
    plan = plan_buffers(art, 2, 16)
    n = 2 * TINY.n_layer
    pointers = ([1000 + i for i in range(n)], [2000 + i for i in range(n)])
    steps, current = [], 0
    for _ in range(4):  # the backend flips `current` after each step: this step's present is the next one's past
        steps.append(plan.kv_addresses(pointers, current))
        current = 1 - current
    pairs = list(zip(art.inputs[3:], art.outputs[1:]))  # same layer, same key/value
    assert len(pairs) == n and all(len(s) == 2 * n for s in steps)
    assert sorted(steps[0].values()) == sorted(pointers[0] + pointers[1]), "every KV tensor gets its own buffer"
    for a, b in zip(steps, steps[1:]):  # step n -> n + 1
        for past, present in pairs:
            assert a[past] != a[present], "a step must not read and write the same buffer"
            assert b[past] == a[present], f"{present} of step n must be the {past} of step n+1"
            assert b[present] == a[past], f"step n+1 must write {present} over step n's {past}: a swap, no third set"
    assert steps[0] != steps[1] and steps[0] == steps[2] and steps[1] == steps[3]  # back again on step n+2


# ---- without TensorRT --------------------------------------------------------------------------------

def _without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError, installed or not


def test_build_engine_cli_without_tensorrt_names_the_extra(tmp_path, monkeypatch, capsys):
    from runtime.cli import main

    _without_tensorrt(monkeypatch)
    (tmp_path / "model.onnx").write_bytes(b"")  # never read: the missing package is said first
    assert main(["build-engine", str(tmp_path), "--out", str(tmp_path / "m.engine")]) == 1
    err = capsys.readouterr().err
    assert "tensorrt package is not installed" in err and "pip install 'nanogpt-deploy[tensorrt]'" in err
    assert "NVIDIA GPU" in err
    assert not (tmp_path / "m.engine").exists()


def test_backend_without_tensorrt_names_the_extra(tmp_path, monkeypatch):
    _without_tensorrt(monkeypatch)
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0" * 1234)
    make_meta().write_json(sidecar_path(engine))
    with pytest.raises(TensorRTError, match=r"pip install 'nanogpt-deploy\[tensorrt\]'"):
        TensorRTBackend(tmp_path)  # the folder resolves to its model.engine
    from runtime.backends import load_backend

    with pytest.raises(TensorRTError, match=r"pip install 'nanogpt-deploy\[tensorrt\]'"):  # as `generate` opens it
        load_backend("tensorrt", str(tmp_path), provider="cpu", threads=None)
    engine.write_bytes(b"\0" * 10)
    with pytest.raises(ArtifactError, match="is 10 bytes, its sidecar describes a 1234-byte engine"):
        TensorRTBackend(engine)
    sidecar_path(engine).unlink()
    with pytest.raises(ArtifactError, match="has no sidecar model.engine.json"):
        TensorRTBackend(engine)
    with pytest.raises(ArtifactError, match="does not exist.*build-engine"):
        resolve_engine(tmp_path / "nothing")


def test_runtime_and_builder_modules_import_without_torch_or_tensorrt():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None\n"
            "import runtime.backends.tensorrt, export.tensorrt, export.cli_engine; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_the_builder_reads_the_engine_schema_without_importing_a_backend():
    """export/ may import runtime's schema (runtime/trt_plan.py, runtime/trt_cuda.py), never a backend."""
    code = ("import sys, export.tensorrt, export.cli_engine\n"
            "print(sorted(m for m in sys.modules if m.startswith('runtime.backends')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_source_hash_covers_external_data_and_cache_path_is_per_gpu(tmp_path, monkeypatch):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"graph")
    (tmp_path / "model.onnx.data").write_bytes(b"weights")
    h1 = onnx_sha256(onnx)
    (tmp_path / "model.onnx.data").write_bytes(b"other weights")
    assert onnx_sha256(onnx) != h1
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_timing_cache("10.9.0.34",
                                "9.0") == tmp_path / "nanogpt-deploy/tensorrt/timing-trt10.9.0.34-sm90.cache"


def test_meta_fields_survive_json(tmp_path):
    # every field written is read back: a new field without a default would break old sidecars
    meta = make_meta()
    assert {f.name for f in dataclasses.fields(EngineMeta)} <= set(meta.to_dict())


def test_buffer_plan_for_a_last_logits_engine_holds_one_position():
    art = Artifact(config=TINY, precision="fp32", logits="last")
    B, S = 4, 32
    plan, full = plan_buffers(art, B, S), plan_buffers(Artifact(config=TINY, precision="fp32"), B, S)
    assert plan.logits.shape == (B, 1, TINY.vocab_size)
    assert full.total_bytes - plan.total_bytes == B * (S - 1) * TINY.vocab_size * 4
    # the sidecar keeps the mode, so the backend plans (and reads back) one position after a reload
    meta = dataclasses.replace(make_meta(), artifact=art)
    assert EngineMeta.from_dict(meta.to_dict()).artifact.logits == "last"


def test_the_backend_presents_the_engines_context_as_block_size():
    """An engine built with --max-seq below the model's block_size: generation (and the scheduler and server,
    which check the same config) refuses a request beyond it up front, not inside the engine's profiles."""
    from types import SimpleNamespace

    from runtime.generation import Generation, GenerationError, SamplingParams

    assert make_meta(max_seq=128).serving_config is TINY
    short = make_meta(max_seq=32).serving_config
    assert short.block_size == 32 and (short.n_layer, short.vocab_size) == (TINY.n_layer, TINY.vocab_size)
    backend = SimpleNamespace(config=short, name="tensorrt")
    Generation(backend, None, [[1] * 20], SamplingParams(max_new_tokens=12))
    with pytest.raises(GenerationError, match="exceeds block_size 32"):
        Generation(backend, None, [[1] * 20], SamplingParams(max_new_tokens=13))


def test_tf32_is_cleared_unless_asked():
    # TensorRT sets BuilderFlag.TF32 in every new builder config: an fp32 engine would run its layers in TF32
    from export.tensorrt import set_tf32

    class Config:
        def __init__(self):
            self.flags = {"TF32"}  # TensorRT's default

        def set_flag(self, f):
            self.flags.add(f)

        def clear_flag(self, f):
            self.flags.discard(f)

    trt = type("trt", (), {"BuilderFlag": type("BuilderFlag", (), {"TF32": "TF32"})})
    for tf32, want in ((False, set()), (True, {"TF32"})):
        c = Config()
        set_tf32(trt, c, tf32)
        assert c.flags == want, f"tf32={tf32}: builder flags {c.flags}, expected {want}"
