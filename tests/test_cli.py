"""`nanogpt-deploy generate` / `demo` end to end on the tiny export: JSON output, the summary line, errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from runtime.cli import main
from runtime.generate import SamplingParams, generate
from runtime.tokenizer import load_tokenizer

SUMMARY = re.compile(r"^(\d+) tokens in [\d.]+ s, [\d.]+ tok/s \[(\w+), (\S+), (\w+)\]$")


@pytest.fixture(scope="module", autouse=True)
def ranks(tokenizer):
    """The CLI loads the tokenizer itself: the ranks must be installed (conftest fails loudly if not)."""


def test_generate_json_end_to_end(tiny_onnx_dir, capsys):
    rc = main(["generate", str(tiny_onnx_dir), "--prompt-ids", "1,2,3", "--prompt-ids", "7, 8", "--temperature", "0",
               "--repetition-penalty", "3", "--max-new-tokens", "12", "--json", "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads(out)
    assert (doc["backend"], doc["provider"], doc["precision"]) == ("onnxruntime", "CPUExecutionProvider", "fp32")
    from runtime.backends import load_backend

    want = generate(load_backend("onnxruntime", str(tiny_onnx_dir), threads=1), load_tokenizer(), [[1, 2, 3], [7, 8]],
                    SamplingParams(temperature=0, repetition_penalty=3.0, max_new_tokens=12))
    for got, c in zip(doc["completions"], want):
        assert got["token_ids"] == c.token_ids and got["text"] == c.text
        assert got["timing"]["ttft_s"] > 0 and len(got["timing"]["decode_latencies_s"]) == len(c.token_ids) - 1
    m = SUMMARY.match(err.strip().splitlines()[-1])
    assert m, err
    assert m.groups() == (str(sum(len(c.token_ids) for c in want)), "onnxruntime", "CPUExecutionProvider", "fp32")


def test_generate_as_a_command_streams_text_then_the_summary(tiny_onnx_dir):
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "generate", str(tiny_onnx_dir), "--prompt-ids", "1,2,3",
                        "--max-new-tokens", "5", "--seed", "0", "--stream", "--ignore-eos", "--threads", "1"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and r.stdout.strip()
    assert SUMMARY.match(r.stderr.strip().splitlines()[-1]).group(1) == "5"


@pytest.mark.parametrize("argv, message", [
    (["--top-p", "1.5"], "top_p must be in (0, 1] (1 = off), got 1.5"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "Hello, my dog"], "token id 15496 but this model's vocabulary is 0..511"),
    (["--max-new-tokens", "200"], "prompt 0 (3 tokens) + max_new_tokens (200) exceeds block_size 128"),
])
def test_generate_bad_inputs_are_one_line_errors(tiny_onnx_dir, capsys, argv, message):
    base = ["generate", str(tiny_onnx_dir)] + (["--prompt-ids", "1,2,3"] if "--prompt" not in argv else [])
    assert main(base + argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_generate_refuses_missing_model_and_unknown_backend(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "none"), "--prompt-ids", "1"]) == 1
    assert "does not exist; give the file or the folder holding model.onnx" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path), "--prompt-ids", "1", "--backend", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt-ids", "1,x"]) == 1
    assert "is not a comma-separated list of integers" in capsys.readouterr().err


def test_generate_torch_backend_from_a_checkpoint_source(capsys):
    assert main(["generate", "random:tiny@0", "--backend", "torch", "--prompt-ids", "1,2,3", "--temperature", "0",
                 "--max-new-tokens", "4", "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)["completions"][0]["token_ids"]) == 4
    assert SUMMARY.match(err.strip().splitlines()[-1]).groups()[1:] == ("torch", "cpu", "fp32")


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-new-tokens", "8", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for stage in ("[1/4] loaded", "[2/4] exported", "[3/4] parity onnxruntime vs torch: max|Δ|", "[4/4] generating"):
        assert stage in out, out
    assert SUMMARY.match(out.strip().splitlines()[-1]), out
    assert (tmp_path / "demo" / "model.onnx").is_file()
