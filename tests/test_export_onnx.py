"""ONNX export: symbolic axes, the torch-vs-onnxruntime parity grid, metadata, atomicity, bad inputs, external data."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from export.onnx import ExportError


def _graph(path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_io_names_and_symbolic_axes(tiny_onnx_dir, tiny_model):
    from runtime.artifact import input_names, output_names

    m = _graph(tiny_onnx_dir / "model.onnx")
    c = tiny_model.config
    assert [v.name for v in m.graph.input] == input_names(c.n_layer)
    assert [v.name for v in m.graph.output] == output_names(c.n_layer)
    io = {v.name: _dims(v) for v in list(m.graph.input) + list(m.graph.output)}
    assert io["input_ids"] == io["position_ids"] == ["batch", "sequence"]
    assert io["attention_mask"] == ["batch", "total_sequence"]
    assert io["logits"] == ["batch", "sequence", c.vocab_size]
    for i in range(c.n_layer):
        for kv in ("key", "value"):
            assert io[f"past_key_values.{i}.{kv}"] == ["batch", c.n_head, "past_sequence", c.head_dim]
            b, h, total, d = io[f"present.{i}.{kv}"]
            assert (b, h, d) == ("batch", c.n_head, c.head_dim) and isinstance(total, str) and total, total


def test_symbolic_axes_check_catches_a_fixed_axis(tiny_onnx_dir, tmp_path):
    import onnx

    from export.check import check_symbolic_axes

    m = _graph(tiny_onnx_dir / "model.onnx")
    m.graph.input[3].type.tensor_type.shape.dim[2].dim_value = 5  # past_key_values.0.key past axis
    onnx.save(m, str(tmp_path / "model.onnx"))
    with pytest.raises(ExportError, match=r"past_key_values\.0\.key\[2\]=5"):
        check_symbolic_axes(tmp_path / "model.onnx")


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("seq", [1, 7])
@pytest.mark.parametrize("past", [0, 5])
def test_parity_grid(tiny_onnx_dir, tiny_model, batch, seq, past):
    from export.check import check_parity

    r = check_parity(tiny_model, tiny_onnx_dir / "model.onnx", shapes=[(batch, seq, past, 0)],
                     seed=batch * 100 + seq * 10 + past)
    assert r["max_abs_diff"] <= 1e-4, f"B{batch}xT{seq}xP{past}: max|Δ|={r['max_abs_diff']:.2e} > 1e-4"


@pytest.mark.parametrize("shape", [(2, 7, 0, 3), (2, 1, 5, 2), (2, 3, 5, 4)], ids=["prefill", "decode", "chunk"])
def test_parity_left_padded_batch(tiny_onnx_dir, tiny_model, shape):
    from export.check import check_parity, parity_feeds

    r = check_parity(tiny_model, tiny_onnx_dir / "model.onnx", shapes=[shape], seed=1)
    assert r["max_abs_diff"] <= 1e-4, f"{shape}: max|Δ|={r['max_abs_diff']:.2e}"
    feeds = parity_feeds(tiny_model.config, *shape, np.random.default_rng(0))
    assert feeds["attention_mask"][0, :shape[3]].sum() == 0 and feeds["position_ids"][1, -1] == shape[1] + shape[2] - 1


def test_parity_check_names_outputs_when_graph_differs(tiny_onnx_dir):
    from export.check import check_parity
    from model import GPT

    other = GPT.from_pretrained("random:tiny@1")  # same shapes, other weights
    with pytest.raises(ExportError, match=r"logits: max\|Δ\|=\d\.\d\de[-+]\d+.*present\.0\.key"):
        check_parity(other, tiny_onnx_dir / "model.onnx", shapes=[(1, 3, 2, 0)])


def test_metadata_round_trip(tiny_onnx_dir, tiny_model):
    from runtime.artifact import Artifact, read_onnx_artifact

    art = read_onnx_artifact(tiny_onnx_dir)
    assert art.config == tiny_model.config and art.precision == "fp32" and art.kv_dtype == "float32"
    assert art.tokenizer == tiny_model.config.tokenizer
    assert {"torch", "onnx", "onnxruntime", "onnxscript", "opset"} <= set(art.versions)
    parity = art.extra["parity"]
    assert parity["atol"] == 1e-4 and parity["max_abs_diff"] <= 1e-4
    assert {"B1xT1xP0", "B2xT7xP0+pad3", "B2xT1xP5+pad2"} <= set(parity["shapes"])
    assert Artifact.from_metadata(art.to_metadata()) == art
    sess = __import__("onnxruntime").InferenceSession(str(tiny_onnx_dir / "model.onnx"),
                                                      providers=["CPUExecutionProvider"])
    assert Artifact.from_metadata(sess.get_modelmeta().custom_metadata_map) == art  # what a torch-free runtime sees


def test_metadata_is_read_from_the_wire_format_without_onnx(tiny_onnx_dir, tmp_path):
    """runtime.artifact.onnx_metadata walks the protobuf's top-level fields and skips the rest: it must equal
    onnx's own parse, with weights inline or external, and turn a truncated or foreign file into one clear error."""
    import onnx

    from runtime.artifact import ArtifactError, onnx_metadata, read_onnx_artifact

    m = onnx.load(str(tiny_onnx_dir / "model.onnx"))  # weights loaded: saved below with every tensor inline
    want = {p.key: p.value for p in m.metadata_props}
    assert onnx_metadata(tiny_onnx_dir / "model.onnx") == want and len(want) > 5
    m.metadata_props.add(key="ünïcode", value="väl" * 200)  # multi-byte, and a value past one varint byte
    want["ünïcode"] = "väl" * 200
    onnx.save(m, str(tmp_path / "inline.onnx"))
    assert (tmp_path / "inline.onnx").stat().st_size > 500_000  # the weights are inside and were skipped
    assert onnx_metadata(tmp_path / "inline.onnx") == want
    data = (tmp_path / "inline.onnx").read_bytes()
    (tmp_path / "model.onnx").write_bytes(data[:len(data) // 2])
    with pytest.raises(ArtifactError, match="is not a readable ONNX file .*export it again"):
        read_onnx_artifact(tmp_path / "model.onnx")
    (tmp_path / "model.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(ArtifactError, match="is not a readable ONNX file"):
        read_onnx_artifact(tmp_path / "model.onnx")


def test_tied_embedding_stored_once(tiny_onnx_dir, tiny_model):
    size = sum(f.stat().st_size for f in tiny_onnx_dir.glob("model.onnx*"))
    weights = tiny_model.num_params() * 4
    data = (tiny_onnx_dir / "model.onnx.data").stat().st_size
    assert 0.95 * weights < data <= weights, f"model.onnx.data {data} bytes vs params*4 {weights}"
    assert size < weights * 1.05 + 256_000


def test_cli_export_from_folder_records_checkpoint_hash(tmp_path, tiny_model, capsys):
    from model.checkpoints import save_model
    from runtime.artifact import read_onnx_artifact
    from runtime.cli import main
    from runtime.files import sha256_file

    ckpt = save_model(tiny_model, tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(ckpt), "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--out", str(out), "--force", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["precision"] == "fp32" and summary["parity"]["max_abs_diff"] <= 1e-4
    assert "validating onnxruntime vs torch" in captured.err  # progress on stderr
    art = read_onnx_artifact(out)
    assert art.source == str(ckpt.resolve()) and art.source_sha256 == sha256_file(ckpt / "model.safetensors")
    assert set(art.extra["source_files"]) == {"model.safetensors", "config.json"}
    assert (out / "notes.txt").read_text() == "mine"
    # a re-export over a previous export needs no --force; the human summary names file, size and shapes
    assert main(["export", str(ckpt), "--out", str(out / "again")]) == 0
    text = capsys.readouterr().out
    assert "model.onnx" in text and "MB" in text and "B2xT7xP0+pad3" in text


def test_interrupted_save_leaves_no_model_onnx(tmp_path, tiny_model, monkeypatch):
    import onnx_ir

    from export.onnx import export_onnx

    out = tmp_path / "out"
    real_save = onnx_ir.save

    def save_then_die(model, path, **kw):
        real_save(model, path, **kw)
        Path(path).with_suffix(".onnx.data").write_bytes(b"half")  # a half-written data file
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(onnx_ir, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_model, out)
    assert sorted(os.listdir(out)) == [], os.listdir(out)


def test_failed_validation_keeps_the_previous_export(tmp_path, tiny_onnx_dir, tiny_model, monkeypatch):
    import export.onnx as ex

    out = tmp_path / "out"
    shutil.copytree(tiny_onnx_dir, out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    (out / ".export-killed").mkdir()  # what a SIGKILLed export leaves: removed by the next one
    (out / ".export-killed" / "model.onnx").write_bytes(b"partial")

    def fail(*a, **k):
        raise ExportError("logits: max|Δ|=1.00e+00 > 1e-04")

    monkeypatch.setattr(ex, "check_parity", fail)
    with pytest.raises(ExportError, match="max"):
        ex.export_onnx(tiny_model, out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def _export_state(out: Path, digests: dict) -> str:
    """"old" or "new": which complete export `out` holds (model.onnx readable, its data file the one it records)."""
    from runtime.artifact import check_weights, read_onnx_artifact

    art = read_onnx_artifact(out)
    assert check_weights(out / "model.onnx", art) == "", f"{out}: no digest recorded"
    return digests[json.dumps(art.data_sha256)]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_a_publish_killed_at_any_step_leaves_the_old_or_the_new_export(tmp_path, tiny_onnx_dir, monkeypatch, exchange):
    """publish over a previous export, killed before its k-th filesystem change (every later change fails too, as
    after a SIGKILL): DIR then loads as the old or the new complete export, never neither or a mix. With the
    atomic exchange that holds at every instant; with two renames, after the next load's recovery. The next export
    into DIR leaves no `.export-*` / `.DIR.publish-*` / `.DIR.old-*` behind."""
    import export.onnx as ex
    from export.publish import OURS, prepare_out_dir, publish
    from model import GPT
    from runtime import files
    from runtime.artifact import read_onnx_artifact
    from runtime.backends import load_backend

    new_src = ex.export_onnx(GPT.from_pretrained("random:tiny@1"), tmp_path / "new", validate=False).parent
    digests = {json.dumps(read_onnx_artifact(d).data_sha256): w for d, w in ((tiny_onnx_dir, "old"), (new_src, "new"))}
    assert len(digests) == 2
    mutators = [(os, "rename"), (os, "replace"), (os, "unlink"), (os, "chmod"), (os, "link"), (shutil, "rmtree"),
                (files, "exchange_paths")]
    states = []
    for k in range(30):
        out = tmp_path / f"k{k}" / "out"
        shutil.copytree(tiny_onnx_dir, out)
        shutil.copytree(new_src, out / ".export-test")
        calls, seen = [], []
        with monkeypatch.context() as mp:
            if not exchange:
                mp.setattr(files, "exchange_paths", lambda a, b: False, raising=False)

            def wrap(mod, name, real=None, k=k, out=out, calls=calls, seen=seen):  # this round's k, out, ...
                real = getattr(mod, name, None)

                def op(*a, **kw):
                    if exchange and len(calls) <= k:  # the state every step starts from
                        seen.append(_export_state(out, digests))
                    calls.append(name)
                    if len(calls) > k:
                        raise KeyboardInterrupt(f"killed before {name} (step {k})")
                    return real(*a, **kw)
                mp.setattr(mod, name, op, raising=False)
            for mod, name in mutators:
                wrap(mod, name)
            try:
                publish(out / ".export-test", out)
                done = True
            except KeyboardInterrupt:
                done = False
        assert set(seen) <= {"old", "new"}, f"step {k}: {seen}"
        state = _export_state(out, digests)  # a load: recovers a half-done two-rename swap first
        states.append(state)
        assert load_backend("onnxruntime", str(out)).artifact.data_sha256 is not None
        prepare_out_dir(out, force=False)  # what the next export does first
        leftovers = sorted(p.name for p in [*out.parent.iterdir(), *out.iterdir()] if p.name.startswith("."))
        assert leftovers == [], f"step {k}: {leftovers}"
        assert sorted(os.listdir(out)) == sorted(OURS), os.listdir(out)  # the tool files included
        if done:
            break
    assert states[0] == "old" and states[-1] == "new" and states == sorted(states, key=["old", "new"].index), (
        f"states after a kill at each step: {states}")
    assert done and len(states) >= 3, f"publish never completed in {k + 1} steps: {calls}"


def test_export_killed_while_publishing_over_a_previous_export_keeps_it(tmp_path, tiny_onnx_dir, monkeypatch):
    """The old behaviour removed the old model.onnx first: a crash while the new data file moved in left no export."""
    import export.onnx as ex
    from export.publish import OURS
    from model import GPT
    from runtime import files
    from runtime.artifact import read_onnx_artifact

    out = tmp_path / "out"
    shutil.copytree(tiny_onnx_dir, out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    real_replace = os.replace

    def replace(src, dst, **kw):
        if Path(dst).parent == out:
            raise OSError(28, "No space left on device (simulated)")
        return real_replace(src, dst, **kw)

    def exchange(a, b):
        raise KeyboardInterrupt("killed mid-publish")

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(files, "exchange_paths", exchange, raising=False)
    with pytest.raises((KeyboardInterrupt, OSError)):
        ex.export_onnx(GPT.from_pretrained("random:tiny@1"), out, validate=False)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert read_onnx_artifact(out).data_sha256 == read_onnx_artifact(tiny_onnx_dir).data_sha256
    ex.export_onnx(GPT.from_pretrained("random:tiny@1"), out, validate=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(os.listdir(out)) == sorted(OURS)


@pytest.mark.parametrize("args,match", [
    (["random:nosuch", "--out", "{tmp}/a"], "unknown preset 'nosuch'"),
    (["{tmp}/missing/ckpt.pt", "--out", "{tmp}/a"], "does not exist"),
    (["random:tiny", "--out", "{tmp}/a", "--opset", "17"], "opset 17 is below 18"),
    (["random:tiny", "--out", "{tmp}/a", "--opset", "99"],
     r"opset 99 is above \d+, the highest .* supports; choose --opset 18 \(the default\) to \d+"),
    (["random:tiny", "--out", "{tmp}/a", "--quantize", "int8", "--dtype", "fp16"],
     "--quantize int8 starts from fp32 weights; drop --dtype fp16"),
    (["random:tiny", "--out", "{tmp}/file/sub"], "cannot write to --out"),
    (["random:tiny", "--out", "{tmp}/foreign"], r"model\.onnx \(not a nanogpt-deploy export\).*--force"),
])
def test_bad_inputs_give_clear_errors(tmp_path, capsys, args, match):
    import re

    from runtime.cli import main

    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "model.onnx").write_bytes(b"\x08\x07")  # someone else's file
    assert main(["export"] + [a.format(tmp=tmp_path) for a in args]) == 1
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not (tmp_path / "a").exists()  # a failed export leaves no empty --out behind


def test_unwritable_out_dir(tmp_path, tiny_model):
    from export.onnx import export_onnx

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes")
        with pytest.raises(ExportError, match="cannot write to --out .*choose a writable folder"):
            export_onnx(tiny_model, ro / "sub")
    finally:
        ro.chmod(0o700)


def test_opset_below_18_rejected_by_api(tmp_path, tiny_model):
    from export.onnx import export_onnx

    with pytest.raises(ExportError, match="opset 17 is below 18"):
        export_onnx(tiny_model, tmp_path, opset=17)


def test_external_data_with_forced_small_threshold(tmp_path, tiny_model, monkeypatch):
    """What a > 2 GB gpt2-xl export relies on, forced on the tiny model: every tensor over the threshold
    lives in model.onnx.data by a relative name, the folder is relocatable, and the variant writer does the same."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    import export.graph as graph
    import export.onnx as ex
    from export.check import check_parity
    from export.quantize import quantize_onnx

    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 64)
    p = ex.export_onnx(tiny_model, tmp_path / "fp32")
    q = quantize_onnx(tmp_path / "fp32", tmp_path / "fp16", "fp16", gate=False)
    for path in (p, q):
        m = _graph(path)
        inline = [t.name for t in m.graph.initializer if not uses_external_data(t) and len(t.raw_data) > 64]
        assert not inline, f"{path}: tensors over the threshold stored inline: {inline}"
        locations = {d.value for t in m.graph.initializer if uses_external_data(t)
                     for d in t.external_data if d.key == "location"}
        assert locations == {"model.onnx.data"}, locations
        n_external = len([t for t in m.graph.initializer if uses_external_data(t)])
        assert n_external >= 4 * tiny_model.config.n_layer + 2, n_external  # every weight matrix, wte and wpe
        onnx.checker.check_model(str(path))
    moved = shutil.move(str(tmp_path / "fp32"), str(tmp_path / "elsewhere"))
    r = check_parity(tiny_model, Path(moved) / "model.onnx", shapes=[(2, 3, 4, 1)])
    assert r["max_abs_diff"] <= 1e-4
    # and the checker catches a data file that does not match
    (Path(moved) / "model.onnx.data").write_bytes(b"short")
    with pytest.raises(ExportError, match="past the end of model.onnx.data"):
        graph.check_external_data(Path(moved) / "model.onnx")


@pytest.mark.slow
def test_export_gpt2_124m_shape(tmp_path):
    """random:gpt2 (124M shape): exports, the tied weight stored once, parity within 1e-4."""
    from export.onnx import export_onnx
    from model import GPT
    from runtime.artifact import read_onnx_artifact

    model = GPT.from_pretrained("random:gpt2")
    p = export_onnx(model, tmp_path / "gpt2")
    data = (tmp_path / "gpt2" / "model.onnx.data").stat().st_size
    assert data <= model.num_params() * 4 < data * 1.01, f"{data} bytes vs params*4 {model.num_params() * 4}"
    parity = read_onnx_artifact(p).extra["parity"]
    assert parity["max_abs_diff"] <= 1e-4, parity


# ---------------------------------------------------------------------------------- logits="last"

@pytest.fixture(scope="module")
def last_onnx_dir(tmp_path_factory, tiny_model):
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("tiny_last")
    export_onnx(tiny_model, out, logits="last")
    return out


def test_last_logits_export_validates_with_one_position(last_onnx_dir, tiny_model):
    from export.check import PARITY_SHAPES, check_parity, check_symbolic_axes
    from runtime.artifact import read_onnx_artifact

    art = read_onnx_artifact(last_onnx_dir)
    assert art.logits == "last" and len(art.extra["parity"]["shapes"]) == len(PARITY_SHAPES)
    assert art.extra["parity"]["max_abs_diff"] <= 1e-4
    io = {v.name: _dims(v) for v in _graph(last_onnx_dir / "model.onnx").graph.output}
    assert io["logits"] == ["batch", 1, tiny_model.config.vocab_size]
    check_symbolic_axes(last_onnx_dir / "model.onnx", "last")
    with pytest.raises(ExportError, match=r"logits\[1\]=1"):  # an "all" graph must keep the sequence axis symbolic
        check_symbolic_axes(last_onnx_dir / "model.onnx", "all")
    with pytest.raises(ExportError,
                       match=r"output shapes differ.*logits: onnxruntime \(1, 1, 512\), torch \(1, 7, 512\)"):
        check_parity(tiny_model, last_onnx_dir / "model.onnx", shapes=((1, 7, 0, 0),), logits="all")


def test_last_logits_backend_returns_the_last_position(last_onnx_dir, tiny_onnx_dir):
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 512, (2, 9), dtype=np.int64)
    mask, pos = np.ones((2, 9), np.int64), np.tile(np.arange(9, dtype=np.int64), (2, 1))
    out = {}
    for name, d in (("all", tiny_onnx_dir), ("last", last_onnx_dir)):
        b = OnnxRuntimeBackend(d, threads=1)
        b.reset(2)
        prefill = b.forward(ids[:, :8], mask[:, :8], pos[:, :8])
        step = b.forward(ids[:, 8:], mask, pos[:, 8:])
        out[name] = prefill, step
    assert out["last"][0].shape == (2, 1, 512) and out["all"][0].shape == (2, 8, 512)
    d = max(float(np.abs(out["last"][0] - out["all"][0][:, -1:]).max()),  # prefill: the last position
            float(np.abs(out["last"][1] - out["all"][1]).max()))  # a decode step: its one position either way
    assert d <= 1e-5, f"last vs all: max|Δ|={d:.2e} > 1e-5"


def test_last_logits_generate_gives_the_same_greedy_tokens(last_onnx_dir, tiny_onnx_dir):
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.generation import SamplingParams, generate

    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [100] * 12]  # different lengths: left padding in one batch
    params = SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=())
    tokens = {name: [c.token_ids for c in generate(OnnxRuntimeBackend(d, threads=1), None, prompts, params)]
              for name, d in (("all", tiny_onnx_dir), ("last", last_onnx_dir))}
    assert tokens["last"] == tokens["all"] and all(len(t) == 24 for t in tokens["last"])


def test_cli_export_logits_last_summary(tmp_path, capsys):
    from runtime.cli import main

    assert main(["export", "random:tiny@0", "--out", str(tmp_path / "m"), "--logits", "last", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["logits"] == "last"
    from export.cli_export import format_summary

    assert "logits last" in format_summary(s) and "(last position)" in format_summary(s)


def test_artifact_without_logits_field_reads_as_all(tiny_onnx_dir):
    from runtime.artifact import Artifact, ArtifactError, read_onnx_artifact

    props = read_onnx_artifact(tiny_onnx_dir).to_metadata()
    del props["nanogpt_deploy.logits"]  # an export from before the field
    assert Artifact.from_metadata(props).logits == "all"
    with pytest.raises(ArtifactError, match="logits 'first'"):
        Artifact.from_metadata(dict(props, **{"nanogpt_deploy.logits": "first"}))


# ---------------------------------------------------------------------------------- files, CLI, small models

@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    from runtime.files import atomic_path, atomic_write_bytes, atomic_write_text

    with _umask(0o022):
        atomic_write_text(tmp_path / "engine.json", "{}")
        atomic_write_bytes(tmp_path / "sub" / "timing.cache", b"x")
        (tmp_path / "old.engine").write_bytes(b"old")
        (tmp_path / "old.engine").chmod(0o600)
        with atomic_path(tmp_path / "old.engine") as tmp, open(tmp, "wb") as f:  # how export/tensorrt.py writes
            f.write(b"new")
    with _umask(0o077):
        atomic_write_text(tmp_path / "private.json", "{}")
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert modes == {"engine.json": 0o644, "timing.cache": 0o644, "old.engine": 0o644, "private.json": 0o600}, modes
    assert (tmp_path / "old.engine").read_bytes() == b"new"


def test_atomic_write_that_raises_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    """runtime/files.py: a block that raises keeps the old content and removes its `.NAME.*.tmp`."""
    from runtime.files import atomic_path, atomic_write_text

    target = tmp_path / "engine.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".engine.json.") and tmp.name.endswith(".tmp")
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.json"]
    with pytest.raises(RuntimeError):  # also when nothing existed before: no file appears
        with atomic_path(tmp_path / "new.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.json"]
    atomic_write_text(target, "new")  # and a block that succeeds replaces it, leaving no temp either
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["engine.json"]


def test_atomic_write_flushes_the_file_before_the_rename(tmp_path, monkeypatch):
    """A power loss after the rename must not leave an empty file: the temp file is fsynced before it gets the
    name, and the folder's entry after."""
    import runtime.files as files

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))  # which file or folder (Linux)
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    files.atomic_write_text(tmp_path / "engine.json", "data")
    (k0, tmp), rest = events[0], events[1:]
    assert k0 == "fsync" and tmp.name.startswith(".engine.json.") and tmp.name.endswith(".tmp"), events
    assert rest == [("replace", tmp_path / "engine.json"), ("fsync", tmp_path)], events


def test_export_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    from model.checkpoints import CheckpointError
    from runtime.cli import main

    monkeypatch.delenv("NANOGPT_DEPLOY_DEBUG", raising=False)
    args = ["export", "random:nosuch", "--out", str(tmp_path / "a")]
    assert main(args) == 1 and "unknown preset" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="unknown preset 'nosuch'"):
        main(args + ["--debug"])
    assert not (tmp_path / "a").exists()


def test_failed_export_removes_only_the_out_dir_it_created(tmp_path, capsys, monkeypatch):
    import export.onnx as ex
    from runtime.cli import main

    # a conflict is refused before anything is loaded or created
    assert main(["export", "random:tiny", "--out", str(tmp_path / "new" / "a"), "--quantize", "int8", "--dtype",
                 "fp16"]) == 1
    assert "loading" not in capsys.readouterr().err and not (tmp_path / "new").exists()
    # a bad SOURCE, then a failure deep in the export: the folders this run made (parents too) are removed
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "new" / "a")]) == 1
    assert not (tmp_path / "new").exists()

    def fail(*a, **k):
        raise ExportError("logits: max|Δ|=1.00e+00 > 1e-04")

    monkeypatch.setattr(ex, "check_parity", fail)
    assert main(["export", "random:tiny@0", "--out", str(tmp_path / "new" / "a")]) == 1
    assert "max|Δ|" in capsys.readouterr().err and not (tmp_path / "new").exists()
    # folders that existed before, empty or not, stay as they were
    (tmp_path / "empty").mkdir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["export", "random:tiny@0", "--out", str(tmp_path / "empty")]) == 1
    assert main(["export", "random:tiny@0", "--out", str(tmp_path / "mine"), "--force"]) == 1
    assert os.listdir(tmp_path / "empty") == [] and os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_cli_export_records_the_absolute_source_and_readable_modes(tmp_path, tiny_model, monkeypatch, capsys):
    from export.trace import recorded_source
    from model.checkpoints import save_model
    from runtime.artifact import read_onnx_artifact
    from runtime.cli import main

    save_model(tiny_model, tmp_path / "weights" / "ckpt")
    monkeypatch.chdir(tmp_path / "weights")
    with _umask(0o022):
        assert main(["export", "ckpt", "--out", "out", "--json"]) == 0
    out = tmp_path / "weights" / "out"
    # the torch reference loads the same checkpoint whatever directory it runs from
    assert read_onnx_artifact(out).source == str((tmp_path / "weights" / "ckpt").resolve())
    modes = {p.name: p.stat().st_mode & 0o777 for p in [out, *out.iterdir()]}
    assert modes == {"out": 0o755, **dict.fromkeys(os.listdir(out), 0o644)} and "model.onnx.data" in modes, modes
    # hub names and random: specs are recorded as given
    assert recorded_source("random:tiny@0") == "random:tiny@0" and recorded_source("gpt2") == "gpt2"
    assert recorded_source("ckpt") == str((tmp_path / "weights" / "ckpt").resolve())


@pytest.mark.parametrize("options", [dict(kv_cache="shared"), dict(quantize="q8"), dict(quantize="int8"),
                                     dict(quantize="int4"), dict(dtype="fp16")],
                         ids=["shared", "q8", "int8", "int4", "fp16"])
def test_every_variant_file_gets_the_umask_mode(tmp_path, tiny_model, options):
    """Variants re-saved through onnx.save (which creates the data file 0o600) must be readable by another user
    serving them: with umask 022 every file is 0644, the folder 0755."""
    from export.onnx import export_onnx

    out = tmp_path / "out"
    with _umask(0o022):
        export_onnx(tiny_model, out, validate=False, gate=False, **options)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [out, *out.rglob("*")]}
    assert modes == {"out": "0o755", **dict.fromkeys(os.listdir(out), "0o644")} and "model.onnx.data" in modes, modes


def test_every_variant_records_the_digest_of_its_own_weights(tmp_path, tiny_onnx_dir, tiny_model, monkeypatch):
    """export_onnx (shared cache, int8) and quantize_onnx record the sha256 of the data file they publish, not
    their source's; a model whose weights all live inside model.onnx records {} (nothing outside to prove)."""
    import export.graph as graph
    import export.onnx as ex
    from export.quantize import quantize_onnx
    from runtime.artifact import check_weights, read_onnx_artifact
    from runtime.files import sha256_file

    outs = [ex.export_onnx(tiny_model, tmp_path / "shared", kv_cache="shared", validate=False),
            ex.export_onnx(tiny_model, tmp_path / "int8", quantize="int8", validate=False, gate=False),
            quantize_onnx(tiny_onnx_dir, tmp_path / "int4", "int4", gate=False)]
    for path in outs:
        art = read_onnx_artifact(path)
        want = {"model.onnx.data": sha256_file(path.parent / "model.onnx.data")}
        assert art.data_sha256 == want, (path, art.data_sha256)
        assert check_weights(path, art) == ""
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 1 << 30)
    inline = ex.export_onnx(tiny_model, tmp_path / "inline", validate=False)
    assert not any(t.HasField("data_location") and t.data_location for t in _graph(inline).graph.initializer)
    assert read_onnx_artifact(inline).data_sha256 == {}
    load_backend = __import__("runtime.backends", fromlist=["load_backend"]).load_backend
    assert load_backend("onnxruntime", str(inline)).artifact.data_sha256 == {}


def test_opset_beyond_the_installed_maximum_is_refused(tmp_path, tiny_model):
    from export.onnx import export_onnx
    from export.trace import max_opset

    top, limited_by = max_opset()
    assert top >= 23 and limited_by  # README recommends --opset 23
    with pytest.raises(ExportError, match=rf"opset {top + 1} is above {top}, the highest .* supports"):
        export_onnx(tiny_model, tmp_path / "a", opset=top + 1)
    assert not (tmp_path / "a").exists()


def test_a_graph_onnxruntime_cannot_load_is_an_export_error(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from export.check import new_session

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "model.onnx"))
    with pytest.raises(ExportError,
                       match=r"onnxruntime .* cannot load the exported graph \(opset 18\): .*NoSuchOp.*--opset 18"):
        new_session(tmp_path / "model.onnx")


def test_parity_shapes_fit_the_block_size():
    from export.check import PARITY_SHAPES, parity_shapes

    assert parity_shapes(128) == PARITY_SHAPES
    for block_size in (1, 4, 7, 8, 11):
        shapes = parity_shapes(block_size)
        assert shapes and len(set(shapes)) == len(shapes)
        assert all(s + p <= block_size and pad < s + p for _, s, p, pad in shapes), shapes
    assert {(1, 4, 4, 0), (2, 7, 0, 3), (2, 1, 5, 2)} <= set(parity_shapes(8))  # chunked decode and padding kept


def test_block_size_8_model_exports_and_is_checked(tmp_path):
    import dataclasses

    from export.check import parity_shapes
    from export.onnx import export_onnx
    from model import GPT
    from model.config import PRESETS
    from runtime.artifact import read_onnx_artifact

    small = GPT(dataclasses.replace(PRESETS["tiny"], block_size=8)).init_weights(0).eval()
    export_onnx(small, tmp_path / "b8")
    parity = read_onnx_artifact(tmp_path / "b8").extra["parity"]
    assert len(parity["shapes"]) == len(parity_shapes(8)) and parity["max_abs_diff"] <= 1e-4, parity
    assert {"B2xT4xP4", "B2xT7xP0+pad3", "B2xT1xP5+pad2"} <= set(parity["shapes"])
    tiny = GPT(dataclasses.replace(PRESETS["tiny"], block_size=6)).init_weights(0)
    with pytest.raises(ExportError, match="block_size 6 is too small to export.*block_size >= 7"):
        export_onnx(tiny, tmp_path / "b6")
    assert not (tmp_path / "b6").exists()


def test_parity_check_fails_on_non_finite_outputs_of_either_side(tiny_onnx_dir, tiny_model, tmp_path):
    """|NaN - x| is NaN and max(0.0, NaN) is 0.0: a NaN model once 'validated' with max|Δ| 0.0 (issue #17)."""
    import copy

    import torch

    from conftest import onnx_with_a_nan_weight
    from export.check import check_parity

    nan_torch = copy.deepcopy(tiny_model)
    with torch.no_grad():
        nan_torch.transformer.h[0].mlp.c_proj.weight[0, 0] = float("nan")  # every later output is NaN
    with pytest.raises(ExportError, match=r"non-finite outputs at B1xT3xP2 .*logits from torch: 1536 of 1536 "
                                          r"values \(1, 3, 512\) \(1536 NaN, 0 inf\); present\.1\.key from torch"):
        check_parity(nan_torch, tiny_onnx_dir / "model.onnx", shapes=[(1, 3, 2, 0)])
    # position 10 poisoned: B1xT1xP0 (position 0) is clean, B2xT7xP5 (positions 5..11) is not
    nan_graph = onnx_with_a_nan_weight(tiny_onnx_dir / "model.onnx", tmp_path / "nan", "model.transformer.wpe.weight",
                                       (10, 0))
    with pytest.raises(ExportError, match=r"non-finite outputs at B2xT7xP5 .*logits from onnxruntime: \d+ of 7168 "
                                          r"values \(2, 7, 512\) \(\d+ NaN, 0 inf\); present\.0\.key from onnxruntime"):
        check_parity(tiny_model, nan_graph, shapes=[(1, 1, 0, 0), (2, 7, 5, 0)])


def test_export_refuses_non_finite_weights_and_outputs(tiny_model, tmp_path):
    """A model edited in memory (GPT.from_pretrained refuses such files) with a NaN weight, or finite weights whose
    activations overflow fp32: neither exports."""
    import copy

    import torch

    from export.onnx import export_onnx

    nan = copy.deepcopy(tiny_model)
    with torch.no_grad():
        nan.transformer.ln_f.weight[9] = float("nan")
    with pytest.raises(ExportError, match=r"tensor transformer\.ln_f\.weight \(64,\) holds 1 non-finite values"):
        export_onnx(nan, tmp_path / "nan")
    assert not (tmp_path / "nan" / "model.onnx").exists()
    overflow = copy.deepcopy(tiny_model)
    with torch.no_grad():  # c_proj sums 256 GELU(1e37) = 2.6e39 > fp32 max 3.4e38: inf, then ln_f(inf) = NaN
        overflow.transformer.h[1].mlp.c_fc.bias.fill_(1e37)
        overflow.transformer.h[1].mlp.c_proj.weight.fill_(1.0)
    with pytest.raises(ExportError, match=r"non-finite outputs at B1xT1xP0 .*logits from torch: 512 of 512 .*"
                                          r"logits from onnxruntime: 512 of 512"):
        export_onnx(overflow, tmp_path / "overflow")
    assert not (tmp_path / "overflow" / "model.onnx").exists()


def test_force_into_a_foreign_folder_keeps_its_own_tool_named_files(tiny_model, tmp_path):
    """A Hugging Face folder's config.json / tokenizer files are that folder's: they make the export refuse
    without --force, and an export that does not write them (a shared-cache one has no config.json) leaves
    them in place with it."""
    from export.graph import ExportError
    from export.onnx import export_onnx

    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"theirs": true}')
    (out / "vocab.json").write_text('{"theirs": true}')
    with pytest.raises(ExportError, match="config.json"):
        export_onnx(tiny_model, out, kv_cache="shared")
    export_onnx(tiny_model, out, kv_cache="shared", force=True, tool_files=False)
    assert (out / "config.json").read_text() == '{"theirs": true}'
    assert (out / "vocab.json").read_text() == '{"theirs": true}'
    assert (out / "model.onnx").exists()
