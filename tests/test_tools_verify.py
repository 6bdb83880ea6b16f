"""`nanogpt-deploy verify` on the tiny model: passes on a good export, exits 1 naming the number and the flag when a
threshold is missed (an impossible threshold, a deliberately perturbed graph), thresholds flags and JSON."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from runtime import cli
from runtime.tokenizer import TokenizerError, load_tokenizer
from runtime.tools.verify import THRESHOLDS, VerifyError, parse_thresholds

FAST = ["--text-tokens", "256", "--window", "64", "--greedy-tokens", "16", "--threads", "1"]


@pytest.fixture(scope="module", autouse=True)
def tokenizer():
    try:
        return load_tokenizer()
    except TokenizerError as e:
        pytest.skip(f"GPT-2 ranks not installed ({e}); run `nanogpt-deploy fetch-tokenizer`")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_model):
    """The tiny model's fp32 export, recording the source verify's torch reference reloads."""
    pytest.importorskip("torch")
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("verify") / "fp32"
    export_onnx(tiny_model, out, source="random:tiny@0")
    return out


@pytest.fixture(scope="module")
def perturbed_export(tiny_export, tmp_path_factory):
    """The same export with noise (std 0.05) on the position embedding: loads and runs, but no longer matches torch."""
    import onnx
    from onnx import numpy_helper

    noise = lambda shape: np.random.default_rng(0).normal(0, 0.05, shape).astype(np.float32)  # noqa: E731
    out = tmp_path_factory.mktemp("verify") / "perturbed"
    shutil.copytree(tiny_export, out)
    m = onnx.load(str(out / "model.onnx"))
    [t] = [t for t in m.graph.initializer if t.name.endswith("wpe.weight")]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + noise(numpy_helper.to_array(t).shape), t.name))
    (out / "model.onnx.data").unlink()
    onnx.save(m, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    # re-record the weights' digest, as an export of these weights would: the numbers, not the load, must fail
    from export.graph import write_metadata
    from runtime.artifact import data_digests, read_onnx_artifact

    art = read_onnx_artifact(out)
    write_metadata(out / "model.onnx", dataclasses.replace(art, data_sha256=data_digests(out / "model.onnx")))
    return out


def run_verify(capsys, *argv):
    rc = cli.main(["verify", *map(str, argv), *FAST])
    return rc, capsys.readouterr()


def test_thresholds_are_the_export_gates(tiny_model):
    from export.quantize import THRESHOLDS as GATE

    for prec, (min_top1, max_ppl) in GATE.items():
        assert THRESHOLDS["max_ppl_change"][prec] == max_ppl, prec
        # q8: the export gate (256 tokens) is looser than verify's 99.5% on 2,048+ tokens; never stricter
        assert THRESHOLDS["min_top1"][prec] == (0.995 if prec == "q8" else min_top1) >= min_top1, prec


def test_passes_on_a_good_export(tiny_export, capsys):
    rc, out = run_verify(capsys, tiny_export, "--json")
    assert rc == 0, out.err
    report = json.loads(out.out)
    assert report["passed"] and report["reference"]["label"] == "torch cpu fp32"
    assert report["reference"]["tf32"] is False, report["reference"]
    assert all(t["tf32"] is False for t in report["targets"]), report["targets"]
    [t] = report["targets"]
    m = t["metrics"]
    assert set(m["max_abs_diff_per_shape"]) == {"B1xT1xP0", "B2xT7xP0", "B2xT1xP5", "B2xT3xP5"}
    assert m["max_abs_diff"] <= 1e-4 and m["top1"] >= 0.999 and abs(m["ppl_change"]) <= 1e-3
    assert m["greedy_match"] == 1.0 and m["greedy_tokens_per_prompt"] == 16
    assert (m["batched_alone"], m["batched_rows"]) == (1.0, 4)  # fp32: a left-padded batch changes no row
    assert "verify passed" in out.err


def test_impossible_threshold_fails_with_the_number_and_the_flag(tiny_export, capsys):
    rc, out = run_verify(capsys, tiny_export, "--min-top1", "fp32=1.01")
    assert rc == 1
    assert "top-1 agreement 100.00%" in out.err and "--min-top1 fp32=1.01" in out.err, out.err
    assert "verify failed: 1 checks" in out.err and "FAIL" in out.out


def test_perturbed_model_fails_on_logits_and_perplexity(perturbed_export, capsys):
    rc, out = run_verify(capsys, perturbed_export, "--json")
    assert rc == 1
    report = json.loads(out.out)
    assert not report["passed"]
    assert any("max|Δlogits|=" in f and "> 1e-04 (--max-abs-diff fp32=0.0001)" in f for f in report["failures"]), \
        report["failures"]
    assert "max|Δlogits|" in out.err
    [m] = [t["metrics"] for t in report["targets"]]
    assert m["ppl_change"] > THRESHOLDS["max_ppl_change"]["fp32"], m["ppl_change"]
    assert any(f.startswith("onnxruntime cpu fp32: perplexity ") and " vs reference " in f
               and "(--max-ppl-change fp32=0.001)" in f for f in report["failures"]), report["failures"]
    assert "perplexity" in out.err and "--max-ppl-change fp32=0.001" in out.err, out.err


def test_a_loosened_threshold_lets_it_pass(perturbed_export, capsys):
    rc, out = run_verify(capsys, perturbed_export, "--max-abs-diff", "fp32=10", "--max-ppl-change", "fp32=1",
                         "--min-top1", "fp32=0", "--min-greedy-match", "fp32=0")
    assert rc == 0, out.err


def test_threshold_flags_parse_and_reject_garbage():
    t = parse_thresholds({"min_top1": ["int8=0.97,int4=0.8"], "max_abs_diff": ["fp16=0.05"]})
    assert t["min_top1"]["int8"] == 0.97 and t["min_top1"]["int4"] == 0.8 and t["max_abs_diff"]["fp16"] == 0.05
    assert THRESHOLDS["min_top1"]["int8"] == 0.95  # the defaults are not modified
    with pytest.raises(VerifyError, match="--min-top1 'int8': expected PRECISION=NUMBER"):
        parse_thresholds({"min_top1": ["int8"]})
    for bad in ("int8=nan", "int8=inf", "int8=-1"):  # nan once passed every check it gated
        with pytest.raises(VerifyError, match="a finite number >= 0"):
            parse_thresholds({"max_ppl_change": [bad]})


@pytest.fixture(scope="module")
def int8_only(tiny_export, tmp_path_factory):
    """A folder holding one export that says it is int8 (the fp32 graph relabelled: verify stops before running it)."""
    import onnx

    out = tmp_path_factory.mktemp("verify") / "tiny-int8"
    shutil.copytree(tiny_export, out)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    [p] = [p for p in m.metadata_props if p.key.endswith("precision")]
    p.value = "int8"
    onnx.save(m, str(out / "model.onnx"))
    return out


def test_no_reference_says_what_is_missing_and_the_flags(int8_only, capsys):
    # with torch installed, this said "torch is not available and no fp32 export was given"
    rc, out = run_verify(capsys, int8_only)
    err = out.err.strip().splitlines()[-1]
    assert rc == 1 and "torch is not" not in err, err
    assert "no fp32 export" in err and "no checkpoint" in err, err
    # the exact command: the checkpoint the export records, as another MODEL
    assert f"nanogpt-deploy verify {int8_only} random:tiny@0" in err, err
    rc, out = run_verify(capsys, int8_only, "--backends", "onnxruntime")
    err = out.err.strip().splitlines()[-1]
    assert rc == 1 and "--backends leaves out torch" in err and "--backends onnxruntime,torch" in err, err
