"""scripts/compare_peers.py without its peers: engine names, the one-line reason an engine is skipped, and the
table when an engine does not run a workload. The measuring itself needs .venv-peers (scripts/setup_peers.sh)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cp():
    spec = importlib.util.spec_from_file_location("compare_peers", ROOT / "scripts" / "compare_peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_engine_families(cp):
    assert [cp.kind(e) for e in ("transformers", "optimum", "ctranslate2-int8", "llamacpp-q4_0", "ours-int8",
                                 "ours-fp32-spec-int4")] == ["transformers", "optimum", "ctranslate2", "llamacpp",
                                                             "ours", "ours"]
    # every CPU `export --quantize` value runs as ours-<quant>, named or not in ENGINES; anything else is refused
    assert cp.unavailable("ours-q8") is None and cp.ours("ours-q8", "shared", "last") == [("q8", "shared", "last")]
    assert cp.unavailable("ours-int4-concat") is None and cp.unavailable("ours-fp32-spec-q8") is None
    for bad in ("ours-somequant", "ours-int8-sharde", "ours-fp32-spec", "ours"):
        assert "unknown engine" in cp.unavailable(bad), bad


def test_skipped_engines_say_why_in_one_line(cp, monkeypatch):
    assert "unknown engine" in cp.unavailable("nosuch")
    assert "unknown CTranslate2 type 'fp8'" in cp.unavailable("ctranslate2-fp8")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("ctranslate2", "llama_cpp") else real(name, *a))
    for engine, flag in (("ctranslate2-fp32", "--with-ctranslate2"), ("llamacpp-q8_0", "--with-llama-cpp")):
        why = cp.unavailable(engine)
        assert "is not installed" in why and f"scripts/setup_peers.sh {flag}" in why and "\n" not in why, why


def test_table_ratios_and_where_tokens_first_differ(cp):
    def run(tokens, lat=0.01):
        return {"tokens": tokens, "ttft_s": 0.02, "latencies_s": [lat] * 127, "wall_s": 0.02 + 127 * lat,
                "peak_rss_mb": 100.0}

    tf = {"batch1": [run([[1] * 128])], "ttft512": [run([[1]])], "batch8": [run([[1] * 128] * 8, 0.02)]}
    b8 = [[1] * 128] * 3 + [[1] * 17 + [2] * 111] + [[1] * 128] * 4
    other = {**tf, "batch1": [run([[1] * 5 + [2] * 123], 0.005)], "batch8": [run(b8, 0.01)]}
    results = [cp.summarize("transformers", tf, {"engine": "transformers"}),
               cp.summarize("llamacpp-f16", other, {"engine": "llamacpp-f16"})]
    report = {"results": results, "goals": cp.check_goals(results), "threads": 2, "opset": 23,
              "machine": {"cpu": "test", "cores": 2, "load_before": [0], "load_after": [0]}}
    row = next(ln for ln in cp.format_table(report).splitlines() if ln.startswith("llamacpp-f16"))
    # twice transformers' decode rate at batch 1 and (about) at batch 8; tokens differ at 5, and row 3 at 17
    assert "2.00x" in row and "at 5 / row 3 at 17" in row, row
