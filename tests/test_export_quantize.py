"""Precision variants (fp16, q8, int8, int4) judged against fp32 by top-1 agreement and perplexity change.

Random weights give flat logits, so these tests use a model with learned structure: the small trained
model at model/weights/pycode when it exists, else the tiny config trained for a few seconds on a
synthetic token process (next = 7*prev + 3 mod vocab with probability 0.9, else uniform).
"""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYCODE = ROOT / "model" / "weights" / "pycode"
STEPS = 200  # ~2 s on one core


def _synthetic(g, batch: int, seq: int, vocab: int, p: float = 0.9):
    import torch

    x = torch.empty(batch, seq, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    noise, rnd = torch.rand(batch, seq, generator=g) > p, torch.randint(0, vocab, (batch, seq), generator=g)
    for t in range(1, seq):
        x[:, t] = torch.where(noise[:, t], rnd[:, t], (x[:, t - 1] * 7 + 3) % vocab)
    return x


def _heldout_ids(batch: int, seq: int):
    """(batch, seq) GPT-2 tokens from the pycode model's validation files (stdlib sources it never trained on),
    one window from the middle of each; None when this Python's stdlib lacks them."""
    import json
    import sysconfig

    from runtime.tokenizer import load_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / f for f in json.loads((PYCODE / "corpus.json").read_text())["val_files"]]
    enc, rows = load_tokenizer(), []
    for f in files:
        if f.is_file() and len(rows) < batch:
            toks = enc.encode(f.read_text(errors="replace"), disallowed_special=())
            if len(toks) >= 2 * seq:
                rows.append(toks[len(toks) // 2: len(toks) // 2 + seq])
    return np.array(rows, dtype=np.int64) if len(rows) == batch else None


@pytest.fixture(scope="module")
def trained():
    """(model, eval_ids): a model whose logits are peaked where its data is predictable."""
    import torch

    from model import GPT, GPTConfig

    if (PYCODE / "config.json").is_file():
        from export.check import sample_eval_ids

        model = GPT.from_pretrained(PYCODE)
        ids = _heldout_ids(batch=8, seq=64)
        return model, ids if ids is not None else sample_eval_ids(model, batch=4, seq=64)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny")).init_weights(0).train()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and immune to a busy machine
    try:
        for _ in range(STEPS):
            x = _synthetic(g, 16, 33, model.config.vocab_size)
            logits, _ = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 2.0, \
        f"synthetic training did not learn (loss {loss.item():.2f}); the variant tests need structure"
    model.checkpoint_files = []
    eval_ids = _synthetic(torch.Generator().manual_seed(1), 4, 64, model.config.vocab_size).numpy()
    return model.eval(), eval_ids


@pytest.fixture(scope="module")
def trained_fp32(tmp_path_factory, trained):
    from export.onnx import export_onnx

    return export_onnx(trained[0], tmp_path_factory.mktemp("trained_fp32"))


@pytest.fixture(scope="module")
def variants(tmp_path_factory, trained, trained_fp32):
    from export.quantize import quantize_onnx

    out = {}
    for precision in ("fp16", "q8", "int8", "int4"):
        out[precision] = quantize_onnx(trained_fp32.parent, tmp_path_factory.mktemp(precision), precision,
                                       eval_ids=trained[1], gate=True)
    return out


def _graph(path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


@pytest.mark.parametrize("precision", ["fp16", "q8", "int8", "int4"])
def test_variant_agreement_and_perplexity(variants, precision):
    from export.quantize import THRESHOLDS
    from runtime.artifact import read_onnx_artifact

    art = read_onnx_artifact(variants[precision])
    v = art.extra["variant"]
    min_agree, max_ppl = THRESHOLDS[precision]
    assert art.precision == precision and v["gated"]
    assert v["top1_agreement"] >= min_agree, f"{precision}: top-1 agreement {v['top1_agreement']:.2%} < {min_agree:.0%}"
    assert v["ppl_change"] <= max_ppl, f"{precision}: perplexity {v['ppl_fp32']} -> {v['ppl']} (+{v['ppl_change']:.2%})"
    # far below uniform (perplexity = vocabulary size): the fp32 model has learned structure to lose
    assert v["ppl_fp32"] < 0.02 * art.config.real_vocab_size, \
        f"the fp32 model has no learned structure (perplexity {v['ppl_fp32']})"
    assert art.extra["parity"]["max_abs_diff"] <= 1e-4  # the fp32 graph it came from was validated
    import onnx

    # valid ONNX, nodes in topological order (TensorRT parses in order)
    onnx.checker.check_model(str(variants[precision]))


# top-1 agreement with fp32 on the demo model's held-out text that issue 24 asks of the CPU variants; measured
# (8 x 64 tokens) q8 100%, int8 98.6%, int4 98.0% (`nanogpt-deploy verify`, 2,048 tokens: 99.6%, 98.1%, 97.5%)
DEMO_TOP1 = {"q8": 0.995, "int4": 0.95}


@pytest.mark.parametrize("precision", sorted(DEMO_TOP1))
def test_variant_meets_the_demo_model_goal(variants, precision):
    from runtime.artifact import read_onnx_artifact

    if not (PYCODE / "config.json").is_file() or _heldout_ids(8, 64) is None:
        pytest.skip("the goal is stated for the demo model on its held-out text")
    v = read_onnx_artifact(variants[precision]).extra["variant"]
    assert v["top1_agreement"] >= DEMO_TOP1[precision], \
        f"{precision}: top-1 agreement {v['top1_agreement']:.2%} < {DEMO_TOP1[precision]:.1%} on the demo model"


def test_variant_gate_rejects_a_wrong_graph(trained, trained_fp32, tmp_path):
    """The evaluator discriminates: the same architecture with random weights, judged as an 'int8 variant' of
    the trained model, fails."""
    from export.onnx import ExportError, export_onnx
    from export.quantize import check_variant, evaluate_variant
    from model import GPT

    config = trained[0].config
    wrong = export_onnx(GPT(config).init_weights(1), tmp_path / "wrong", validate=False)
    m = evaluate_variant(trained_fp32, wrong, trained[1], config.real_vocab_size, "float32")
    assert m["top1_agreement"] < 0.5
    with pytest.raises(ExportError, match=r"int8 variant failed validation .*top-1 agreement"):
        check_variant(m, "int8")


def test_fp16_graph_keeps_layernorm_softmax_fp32_and_plain_ops(variants, trained):
    import onnx

    m = _graph(variants["fp16"])
    fp16 = onnx.TensorProto.FLOAT16
    io = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.input) + list(m.graph.output)}
    assert all(t == fp16 for n, t in io.items() if n.startswith(("past_key_values", "present", "logits"))), io
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}, "fp16 graph must stay plain ONNX (TensorRT)"
    producers = {o: n for n in m.graph.node for o in n.output}
    for node in m.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            src = producers.get(node.input[0])
            assert src is not None and src.op_type == "Cast" and src.attribute[0].i == onnx.TensorProto.FLOAT, \
                f"{node.name} ({node.op_type}) does not compute in fp32"
    # tied embedding stored once, in fp16: about params*2 bytes
    data = variants["fp16"].with_name("model.onnx.data").stat().st_size
    assert data < trained[0].num_params() * 2 * 1.05 + 65536, f"fp16 data {data} bytes: weight duplicated?"


@pytest.mark.parametrize("precision,op", [("int8", "MatMulInteger"), ("int4", "MatMulNBits")])
def test_quantized_graph_quantizes_every_weight_matmul_including_lm_head(variants, trained, precision, op):
    m = _graph(variants[precision])
    inits = {t.name for t in m.graph.initializer}
    ops = collections.Counter(n.op_type for n in m.graph.node)
    n_layer = trained[0].config.n_layer
    assert ops[op] == 4 * n_layer + 1, f"{precision}: {ops[op]} {op} nodes, expected 4 per layer + lm_head; {ops}"
    float_weight_matmuls = [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert not float_weight_matmuls, f"{precision}: MatMuls left with float weights: {float_weight_matmuls}"
    # the embedding lookups: 8-bit blocks, no float table left (int4's split lm_head gathers from wte's a third time)
    lookups = [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(lookups) == 2 + (precision == "int4") and all(a.i == 8 for n in lookups for a in n.attribute
                                                             if a.name == "bits"), ops
    if precision == "int8":  # logits come out of the quantized lm_head (through at most a Mul/Cast rescale)
        producers = {o: n for n in m.graph.node for o in n.output}
        node, hops = producers["logits"], 0
        while node.op_type != op and hops < 4:
            node, hops = producers[node.input[0]], hops + 1
        assert node.op_type == op, f"{precision}: logits are not produced by a {op}"


def test_int4_splits_the_tied_lm_head(variants, trained):
    """int4's tied lm_head: a 4-bit pass (COARSE_HEAD) whose top HEAD_TOP_K logits are redone from the 8-bit wte
    lookup table and scattered back into the logits."""
    from export.quantize import COARSE_HEAD, HEAD_TOP_K, SPLIT_HEAD

    m = _graph(variants["int4"])
    inits = {t.name: t for t in m.graph.initializer}
    lookups = [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]
    wte = next(n for n in lookups if n.input[1] == "input_ids")
    producers = {o: n for n in m.graph.node for o in n.output}
    scatter = producers["logits"]
    assert scatter.op_type == "ScatterElements", f"int4: logits come from {scatter.op_type}"
    full, top = producers[scatter.input[0]], producers[scatter.input[1]]
    assert full.name.startswith(SPLIT_HEAD) and full.op_type == "MatMulNBits", (full.name, full.op_type)
    attrs = {a.name: a.i for a in full.attribute}
    want = (COARSE_HEAD[0], min(COARSE_HEAD[1], trained[0].config.n_embd))
    assert (attrs["bits"], attrs["block_size"]) == want, (attrs, want)
    assert top.op_type == "TopK" and top.input[0] == full.output[0], top
    k = int(np.frombuffer(inits[top.input[1]].raw_data, np.int64)[0])
    assert k == HEAD_TOP_K, k
    rows = next(n for n in lookups if n.input[1] == top.output[1])
    assert (rows.input[0], rows.input[2]) == (wte.input[0], wte.input[2]), "the redo reads another table than wte's"


def test_split_lm_head_leaves_an_untied_head_alone(trained_fp32):
    """An untied lm_head (its rows are not the lookup table's) stays one MatMul: the redo would read other weights."""
    import onnx
    from onnx import numpy_helper

    from export.quantize import quantize_lookups, split_lm_head, untie_lm_head

    proto = untie_lm_head(onnx.load(str(trained_fp32)))
    head = next(t for t in proto.graph.initializer if t.name == "lm_head.weight.T")
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * 1.5, head.name))
    proto, split = split_lm_head(quantize_lookups(proto), 8)
    assert not split and not any(n.op_type == "TopK" for n in proto.graph.node)
    proto, split = split_lm_head(quantize_lookups(untie_lm_head(onnx.load(str(trained_fp32)))), 8)
    assert split and sum(n.op_type == "TopK" for n in proto.graph.node) == 1


def test_q8_quantizes_the_layers_and_an_untied_lm_head_and_keeps_the_lookups_fp32(variants, trained):
    """q8: every layer MatMul is an 8-bit MatMulNBits (block 32), the lm_head an 8-bit MatMulNBits (block 16) of its
    own untied copy of wte, and the lookups read the fp32 table as exported (8-bit lookups cost q8 its margin)."""
    from export.quantize import NBITS

    m = _graph(variants["q8"])
    inits = {t.name: t for t in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    head = producers["logits"]
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * trained[0].config.n_layer + 1, [n.name for n in nbits]
    for n in nbits:
        attrs = {a.name: a.i for a in n.attribute}
        want = NBITS["q8"][1] if n is head else NBITS["q8"][0]
        assert (attrs["bits"], attrs["block_size"]) == want == ((8, 16) if n is head else (8, 32)), (n.name, attrs)
    assert head.op_type == "MatMulNBits", head
    [lookup] = [n for n in m.graph.node if n.op_type == "Gather" and n.input[0] in inits
                and list(inits[n.input[0]].dims) == [trained[0].config.vocab_size, trained[0].config.n_embd]]
    assert inits[lookup.input[0]].data_type == 1, "the wte lookup is not fp32"  # onnx.TensorProto.FLOAT
    assert not any(n.op_type == "GatherBlockQuantized" for n in m.graph.node)


def test_quantized_files_hold_no_stray_fp32_weights(variants, trained_fp32, trained):
    """fp16 halves the file. int8/int4 hold the vocabulary twice, as an 8-bit lookup table and a quantized lm_head
    (it is untied to be quantized): more than V*C*1 bytes over fp32 would mean fp32 weights left behind. q8 keeps
    the fp32 table for its lookups beside an 8-bit lm_head. (GPT-2 124M: fp32 498 MB, q8 302, int8 168, int4 109.)"""
    c = trained[0].config
    size = {k: sum(f.stat().st_size for f in p.parent.glob("model.onnx*")) for k, p in variants.items()}
    fp32 = sum(f.stat().st_size for f in trained_fp32.parent.glob("model.onnx*"))
    lm_head_int8 = c.vocab_size * c.n_embd
    assert size["fp16"] < 0.75 * fp32, (size, fp32)
    assert size["int4"] < size["int8"] < fp32 + lm_head_int8, (size, fp32, lm_head_int8)
    # the fp32 vocabulary (the lookups) plus its 8-bit copy (1 byte and an fp32 scale per 16 weights: 1.25 bytes)
    assert size["q8"] < fp32 + 1.3 * lm_head_int8, (size, fp32)


def test_variant_needs_fp32_source(variants, tmp_path):
    from export.onnx import ExportError
    from export.quantize import quantize_onnx

    with pytest.raises(ExportError, match="variants are built from an fp32 export"):
        quantize_onnx(variants["int8"].parent, tmp_path / "x", "int4")


def test_export_onnx_int8_end_to_end_gated(trained, tmp_path):
    """The one-call path (what `export --quantize int8` runs): trace, fp32 parity, variant, gate, one model.onnx."""
    from export.onnx import export_onnx
    from export.publish import OURS
    from runtime.artifact import read_onnx_artifact

    p = export_onnx(trained[0], tmp_path / "int8", quantize="int8", eval_ids=trained[1], gate=True)
    art = read_onnx_artifact(p)
    assert art.precision == "int8" and art.kv_dtype == "float32" and art.extra["variant"]["gated"]
    assert sorted(f.name for f in p.parent.iterdir()) == sorted(OURS)  # no fp32 graph left; the tool files


def test_export_q8_shared_cache_gated_and_generates_fp32s_tokens(trained, tmp_path):
    """`export --quantize q8 --kv-cache shared --logits last`, gated, then greedy generate() through the runtime's
    onnxruntime backend: near-lossless, so the tokens are the fp32 export's."""
    from export.onnx import export_onnx
    from runtime.artifact import read_onnx_artifact
    from runtime.backends import load_backend
    from runtime.generation import SamplingParams, generate

    opts = dict(kv_cache="shared", logits="last", eval_ids=trained[1])
    q8 = export_onnx(trained[0], tmp_path / "q8", quantize="q8", gate=True, **opts)
    fp32 = export_onnx(trained[0], tmp_path / "fp32", **opts)
    art = read_onnx_artifact(q8)
    assert art.precision == "q8" and art.extra["variant"]["gated"] and art.kv_cache == "shared"
    params = SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=())
    prompts = [trained[1][0, :16].tolist(), trained[1][1, :9].tolist()]
    tokens = {name: [c.token_ids for c in generate(load_backend("onnxruntime", str(p), threads=1), None, prompts,
                                                    params)]
              for name, p in (("q8", q8), ("fp32", fp32))}
    assert tokens["q8"] == tokens["fp32"], tokens


# ---- the gate fires through the public paths ------------------------------------------------------------
# Thresholds no variant can meet make the gate's verdict certain (agreement is at most 100%; perplexity cannot
# fall by 100%), so these tests say whether the gate runs, not how good a variant is.
FAIL_AGREEMENT = (1.01, 10.0)  # only top-1 agreement fails
FAIL_PERPLEXITY = (0.0, -1.0)  # only the perplexity change fails


@pytest.mark.parametrize("thresholds,named,not_named", [
    (FAIL_AGREEMENT, "top-1 agreement with fp32", "perplexity"),
    (FAIL_PERPLEXITY, "perplexity", "top-1 agreement")])
def test_quantize_onnx_gate_refuses_a_failing_variant_and_publishes_nothing(trained, trained_fp32, tmp_path,
                                                                            monkeypatch, thresholds, named, not_named):
    from export import quantize
    from export.onnx import ExportError

    monkeypatch.setitem(quantize.THRESHOLDS, "int8", thresholds)
    out = tmp_path / "int8"
    with pytest.raises(ExportError, match=r"int8 variant failed validation") as e:
        quantize.quantize_onnx(trained_fp32.parent, out, "int8", eval_ids=trained[1], gate=True)
    msg = str(e.value)
    assert named in msg and not_named not in msg, msg
    assert list(out.iterdir()) == [], "a refused variant must leave no model.onnx (nor data, nor temp folder)"


def test_quantize_onnx_without_gate_records_the_same_failing_numbers(trained, trained_fp32, tmp_path, monkeypatch):
    from export import quantize
    from runtime.artifact import read_onnx_artifact

    monkeypatch.setitem(quantize.THRESHOLDS, "int8", FAIL_AGREEMENT)
    p = quantize.quantize_onnx(trained_fp32.parent, tmp_path / "int8", "int8", eval_ids=trained[1], gate=False)
    v = read_onnx_artifact(p).extra["variant"]
    assert v["gated"] is False and v["thresholds"]["min_top1_agreement"] == FAIL_AGREEMENT[0]
    assert v["top1_agreement"] < FAIL_AGREEMENT[0]  # it would have failed: recorded, not enforced


@pytest.fixture
def saved_tiny(tiny_model, tmp_path):
    """The tiny model as a checkpoint folder: an export from files, which export_onnx gates by default."""
    from model.checkpoints import save_model

    return save_model(tiny_model, tmp_path / "ckpt")


def _export_cli(capsys, *argv):
    from runtime.cli import main

    rc = main(["export", *map(str, argv), "--quantize", "int8", "--json"])
    out = capsys.readouterr()
    return rc, out


def test_export_cli_gates_a_model_from_files_by_default(saved_tiny, tmp_path, monkeypatch, capsys):
    from export import quantize

    monkeypatch.setitem(quantize.THRESHOLDS, "int8", FAIL_AGREEMENT)
    out = tmp_path / "int8"
    rc, res = _export_cli(capsys, saved_tiny, "--out", out)
    assert rc == 1, res.err
    assert "error: int8 variant failed validation" in res.err and "top-1 agreement with fp32" in res.err, res.err
    assert not (out / "model.onnx").exists() and not out.exists(), "a refused export must publish nothing"


def test_export_cli_no_gate_records_but_does_not_fail(saved_tiny, tmp_path, monkeypatch, capsys):
    import json

    from export import quantize
    from runtime.artifact import read_onnx_artifact

    monkeypatch.setitem(quantize.THRESHOLDS, "int8", FAIL_AGREEMENT)
    out = tmp_path / "int8"
    rc, res = _export_cli(capsys, saved_tiny, "--out", out, "--no-gate")
    assert rc == 0, res.err
    v = json.loads(res.out)["variant"]
    assert v["gated"] is False and v["top1_agreement"] < FAIL_AGREEMENT[0]
    assert read_onnx_artifact(out).precision == "int8"


def test_export_of_random_weights_records_but_does_not_gate_by_default(tiny_model, tmp_path, monkeypatch, capsys):
    """Random weights (no checkpoint files) give flat logits: export_onnx's default gate is off for them."""
    import json

    from export import quantize
    from export.onnx import export_onnx
    from runtime.artifact import read_onnx_artifact

    monkeypatch.setitem(quantize.THRESHOLDS, "int8", FAIL_AGREEMENT)
    assert not getattr(tiny_model, "checkpoint_files", [])
    p = export_onnx(tiny_model, tmp_path / "api", quantize="int8")  # gate left at its default
    assert read_onnx_artifact(p).extra["variant"]["gated"] is False
    rc, res = _export_cli(capsys, "random:tiny@0", "--out", tmp_path / "cli")
    assert rc == 0, res.err
    assert json.loads(res.out)["variant"]["gated"] is False


def test_export_onnx_default_gate_follows_the_checkpoint_files(tiny_model, tmp_path, monkeypatch):
    """The API, not only the CLI: a model loaded from files is gated when `gate` is left at None."""
    from export import quantize
    from export.onnx import ExportError, export_onnx
    from model import GPT
    from model.checkpoints import save_model

    monkeypatch.setitem(quantize.THRESHOLDS, "int8", FAIL_PERPLEXITY)
    model = GPT.from_pretrained(str(save_model(tiny_model, tmp_path / "ckpt")))
    assert model.checkpoint_files
    with pytest.raises(ExportError, match=r"int8 variant failed validation .*perplexity"):
        export_onnx(model, tmp_path / "out", quantize="int8")
    assert list((tmp_path / "out").iterdir()) == [], "a refused export must publish nothing"


def test_variant_with_non_finite_logits_is_refused_even_ungated(tiny_onnx_dir, tmp_path, monkeypatch):
    """NaN fails no comparison and argmax of a NaN row is token 0: the numbers alone would let a NaN variant
    through, and gate=False (random weights, the default for them) would publish it (issue #17)."""
    from conftest import onnx_with_a_nan_weight
    from export import quantize
    from export.onnx import ExportError

    nan_graph = onnx_with_a_nan_weight(tiny_onnx_dir / "model.onnx", tmp_path / "nan")

    def nan_variant(src, dst, precision):
        import shutil

        for f in nan_graph.parent.iterdir():
            shutil.copy(f, dst.parent / f.name)
        return {"method": "a graph whose lm_head holds a NaN"}

    monkeypatch.setattr(quantize, "make_variant", nan_variant)
    ids = np.random.default_rng(0).integers(0, 512, (2, 16), dtype=np.int64)
    with pytest.raises(ExportError, match=r"model\.onnx gives non-finite logits on the 2x16 evaluation tokens: "
                                          r"32 of 16384 values \(32 NaN, 0 inf\)"):
        quantize.quantize_onnx(tiny_onnx_dir, tmp_path / "out", "int8", eval_ids=ids, gate=False)
    assert not (tmp_path / "out" / "model.onnx").exists(), "a NaN variant must not be published"


def test_check_variant_fails_nan_metrics():
    from export.onnx import ExportError
    from export.quantize import check_variant

    nan = float("nan")
    for metrics in ({"top1_agreement": nan, "ppl_change": 0.0}, {"top1_agreement": 1.0, "ppl_change": nan}):
        with pytest.raises(ExportError, match="int8 variant failed validation"):
            check_variant(dict(metrics, ppl=nan, ppl_fp32=2.0, eval_tokens=64), "int8")


def _casts_per_consumer(convert):
    """The float16 converter as onnxruntime 1.31 behaves: one Cast per blocked node reading an fp16
    initializer, all named after the initializer (1.32 shares one). Duplicates what `convert` built."""
    import copy

    def convert_131(*args, **kwargs):
        proto = convert(*args, **kwargs)
        g = proto.graph
        for cast in [n for n in g.node if n.op_type == "Cast" and n.name.endswith("_cast_to_fp32_node")]:
            readers = sum(cast.output[0] in n.input for n in g.node)
            info = [v for v in g.value_info if v.name == cast.output[0]]
            for _ in range(readers - 1):
                g.node.append(copy.deepcopy(cast))
                g.value_info.extend(copy.deepcopy(info))
        return proto

    return convert_131


def _shared_initializer_graph(path):
    """x -> LayerNorm(w, b) -> Add(b) -> LayerNorm(w, b) -> Add(w): w and b each feed two blocked (fp32)
    LayerNorms and one fp16 Add, as the exporter shares equal LayerNorm weights and zero biases."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    nodes = [helper.make_node("LayerNormalization", ["x", "w", "b"], ["h1"], name="ln_1", axis=-1),
             helper.make_node("Add", ["h1", "b"], ["h2"], name="add_1"),
             helper.make_node("LayerNormalization", ["h2", "w", "b"], ["h3"], name="ln_2", axis=-1),
             helper.make_node("Add", ["h3", "w"], ["y"], name="add_2")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [w, b])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _assert_valid_unique_graph(path):
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(path))
    names = collections.Counter(n.name for n in m.graph.node)
    outputs = collections.Counter(o for n in m.graph.node for o in n.output)
    assert not [k for k, c in names.items() if c > 1], f"duplicate node names: {[k for k, c in names.items() if c > 1]}"
    twice = [k for k, c in outputs.items() if c > 1]
    assert not twice, f"values defined twice: {twice}"
    onnx.checker.check_model(str(path), full_check=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("converter", ["installed", "onnxruntime-1.31"])
def test_fp16_names_stay_unique_when_one_initializer_feeds_several_blocked_nodes(tmp_path, monkeypatch, converter):
    """On onnxruntime-gpu 1.31.1 `--dtype fp16` of random:gpt2@0 failed to load: 'two nodes with same node name
    (...ln_1.weight_cast_to_fp32_node)', then 'Duplicate definition of name' (issue #17)."""
    import onnx
    import onnxruntime as ort
    import onnxruntime.transformers.float16 as f16

    from export.quantize import make_variant

    src = _shared_initializer_graph(tmp_path / "fp32.onnx")
    if converter != "installed":
        monkeypatch.setattr(f16, "convert_float_to_float16", _casts_per_consumer(f16.convert_float_to_float16))
        raw = f16.convert_float_to_float16(str(src), keep_io_types=False, op_block_list=["LayerNormalization"])
        dup = [k for k, c in collections.Counter(n.name for n in raw.graph.node).items() if c > 1]
        assert sorted(dup) == ["b_cast_to_fp32_node", "w_cast_to_fp32_node"], dup  # the converter's output is invalid
    dst = tmp_path / "fp16" / "model.onnx"
    dst.parent.mkdir()
    make_variant(src, dst, "fp16")
    session = _assert_valid_unique_graph(dst)
    casts = sorted(n.name for n in onnx.load(str(dst)).graph.node if n.op_type == "Cast")
    assert casts == ["b_cast_to_fp32_node", "h1_cast_to_fp16_node", "h2_cast_to_fp32_node", "h3_cast_to_fp16_node",
                     "w_cast_to_fp32_node", "x_cast_to_fp32_node"], casts  # one per value: the shared ones cast once
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = session.run(None, {"x": x.astype(np.float16)})[0].astype(np.float32)
    d = float(np.abs(got - want).max())
    assert d < 2e-2, f"fp16 vs fp32: max|Δ|={d:.2e} > 2e-2"


def test_fp16_of_an_export_sharing_layernorm_initializers_is_valid(tiny_onnx_dir, tmp_path, monkeypatch):
    """The exporter stores the random model's equal LayerNorm weights and zero biases once: with 1.31's
    per-consumer Casts its fp16 graph still loads."""
    import onnxruntime.transformers.float16 as f16

    from export.quantize import make_variant

    monkeypatch.setattr(f16, "convert_float_to_float16", _casts_per_consumer(f16.convert_float_to_float16))
    dst = tmp_path / "model.onnx"
    make_variant(tiny_onnx_dir / "model.onnx", dst, "fp16")
    _assert_valid_unique_graph(dst)


def test_unique_names_renames_distinct_nodes_and_refuses_conflicting_definitions():
    from onnx import TensorProto, helper

    from export.onnx import ExportError
    from export.quantize import unique_names

    def model(*nodes):
        graph = helper.make_graph(list(nodes), "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    m = unique_names(model(helper.make_node("Relu", ["x"], ["y"], name="n"),
                           helper.make_node("Neg", ["y"], ["z"], name="n"),
                           helper.make_node("Relu", ["x"], ["y"], name="n_1")))
    assert [(n.name, n.op_type) for n in m.graph.node] == [("n", "Relu"),
                                                           ("n_1", "Neg")]  # the 2nd Relu: a repeat, dropped
    with pytest.raises(ExportError, match=r"defines 'y' twice, by different computations \(Relu a and Sigmoid b\)"):
        unique_names(model(helper.make_node("Relu", ["x"], ["y"], name="a"),
                           helper.make_node("Sigmoid", ["x"], ["y"], name="b"),
                           helper.make_node("Neg", ["y"], ["z"], name="c")))


def test_quantized_variants_are_smaller_than_fp32(variants, trained_fp32):
    """The embedding is quantized too (8-bit GatherBlockQuantized lookups): with it left fp32 beside the
    quantized lm_head, a small model's int8 / int4 files came out larger than its fp32 one. q8 keeps the fp32 table
    for its lookups beside the 8-bit lm_head (fidelity first): larger than fp32 on this model, as its export summary
    says (test_q8_export_summary_explains_its_size)."""
    def size(p):
        return sum(f.stat().st_size for f in p.parent.glob("model.onnx*"))

    fp32 = size(trained_fp32)
    # int8 and int4 hold the vocabulary twice (the lookup table and the untied lm_head), each at about a byte per
    # weight: 0.50 of fp32 each on the demo model (its vocabulary is 88% of its weights)
    for precision, most in (("fp16", 0.55), ("int8", 0.6), ("int4", 0.55)):
        got = size(variants[precision])
        assert got <= most * fp32, f"{precision}: {got / 1e6:.2f} MB > {most:.0%} of fp32's {fp32 / 1e6:.2f} MB"


def test_q8_export_summary_explains_its_size(variants):
    """The summary `export` prints says what a quantized file holds, and why q8's can outgrow fp32's."""
    from export.cli_export import format_summary, summarize

    q8 = format_summary(summarize(variants["q8"], 1.0))
    assert "layers 8-bit blocks of 32; lm_head untied, 8-bit, block 16; lookups fp32" in q8, q8
    assert "a file larger than fp32's" in q8, q8
    int4 = format_summary(summarize(variants["int4"], 1.0))
    assert "layers 4-bit blocks of" in int4 and "lookups 8-bit GatherBlockQuantized" in int4, int4
    assert "larger than fp32" not in int4 and "larger than fp32" not in format_summary(summarize(variants["int8"], 1.0))
