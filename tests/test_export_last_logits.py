"""Exports with `--logits last` (logits [batch, 1, vocab]): precision variants built from them still validate,
their evaluation sees every position (step-by-step decoding), and `verify` judges them the same way.

The trained pycode model (model/weights/pycode) gives logits with structure; the variants are gated as in
test_export_quantize.py, and a "last" graph's metrics must equal an "all" graph's on the same tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYCODE = ROOT / "model" / "weights" / "pycode"


@pytest.fixture(scope="module")
def model_and_ids():
    from export.check import sample_eval_ids
    from model import GPT

    if not (PYCODE / "config.json").is_file():
        pytest.skip("model/weights/pycode is not here (the variant gates need a trained model)")
    model = GPT.from_pretrained(PYCODE)
    return model, sample_eval_ids(model, batch=4, seq=48)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, model_and_ids):
    """The fp32 export of the pycode model in both logits modes."""
    from export.onnx import export_onnx

    model = model_and_ids[0]
    return {mode: export_onnx(model, tmp_path_factory.mktemp(f"pycode_{mode}"), logits=mode, source=str(PYCODE))
            for mode in ("all", "last")}


def test_evaluation_logits_are_per_position_in_both_modes(exports, model_and_ids):
    from export.check import new_session
    from export.quantize import DECODE_STEPS, _logits

    ids = model_and_ids[1]
    full = _logits(new_session(exports["all"]), ids, np.float32, decode_steps=0)
    for steps in (0, DECODE_STEPS):  # a "last" graph decodes every position whatever was asked
        got = _logits(new_session(exports["last"]), ids, np.float32, decode_steps=steps)
        assert got.shape == full.shape == (*ids.shape, model_and_ids[0].config.vocab_size)
        d = float(np.abs(got - full).max())
        assert d <= 1e-4, f"last (decode_steps={steps}) vs all: max|Δ|={d:.2e} > 1e-4"


@pytest.mark.parametrize("precision", ["fp16", "q8", "int8", "int4"])
def test_variant_of_a_last_export_validates_like_the_all_one(tmp_path, exports, model_and_ids, precision):
    import onnx

    from export.quantize import THRESHOLDS, quantize_onnx
    from runtime.artifact import read_onnx_artifact

    ids = model_and_ids[1]
    arts = {mode: read_onnx_artifact(quantize_onnx(exports[mode].parent, tmp_path / mode, precision,
                                                   eval_ids=ids, gate=True))
            for mode in ("all", "last")}
    last, full = arts["last"], arts["all"]
    assert last.logits == "last" and last.precision == precision
    v, w = last.extra["variant"], full.extra["variant"]
    min_agree, max_ppl = THRESHOLDS[precision]
    assert v["top1_agreement"] >= min_agree and v["ppl_change"] <= max_ppl, v
    # the same weights, judged on the same tokens: the numbers match the "all" variant's
    assert abs(v["ppl_fp32"] - w["ppl_fp32"]) <= 1e-3 * w["ppl_fp32"], (v, w)
    assert abs(v["top1_agreement"] - w["top1_agreement"]) <= 0.02, (v, w)
    g = onnx.load(str(tmp_path / "last" / "model.onnx"), load_external_data=False)
    assert [d.dim_param or d.dim_value for d in g.graph.output[0].type.tensor_type.shape.dim][1] == 1
    head = [n.op_type for n in g.graph.node if "logits" in n.output]
    if precision in ("q8", "int8", "int4"):  # the untied lm_head is quantized behind the slice too
        assert last.extra["quantization"]["lm_head"].startswith("untied, "), last.extra["quantization"]
        assert head and head[0] != "MatMul", head  # int8: the Mul rescaling MatMulInteger; q8, int4: MatMulNBits


def test_verify_judges_a_last_export_by_step_by_step_decoding(exports, capsys):
    from runtime import cli

    rc = cli.main(["verify", str(exports["last"].parent), "--json", "--text-tokens", "256", "--window", "64",
                   "--greedy-tokens", "16", "--threads", "1"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    report = json.loads(out.out)
    [t] = report["targets"]
    m = t["metrics"]
    assert m["max_abs_diff"] <= 1e-4 and m["top1"] >= 0.999 and abs(m["ppl_change"]) <= 1e-3, m
    assert m["greedy_match"] == 1.0
    assert any("--logits last" in n and "step-by-step" in n for n in report["notes"]), report["notes"]
