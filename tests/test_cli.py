"""`nanogpt-deploy generate` / `demo` end to end on the tiny export: JSON output, the summary line, errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from runtime.cli import COMMANDS, main
from runtime.generation import SamplingParams, generate
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
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and r.stdout.strip()
    assert SUMMARY.match(r.stderr.strip().splitlines()[-1]).group(1) == "5"


def test_generate_json_records_the_seed_it_used(tiny_onnx_dir, capsys):
    base = ["generate", str(tiny_onnx_dir), "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--ignore-eos",
            "--json", "--threads", "1"]
    assert main(base + ["--temperature", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] is None  # greedy draws nothing
    assert main(base + ["--seed", "7"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 7
    assert main(base) == 0  # sampling without --seed: the seed drawn is recorded, and repeats the run
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert isinstance(doc["seed"], int) and f"seed {doc['seed']} (drawn; --seed {doc['seed']} repeats" in err, err
    assert main(base + ["--seed", str(doc["seed"])]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["completions"][0]["token_ids"] == doc["completions"][0]["token_ids"]


def test_generate_no_stream_heads_each_row_with_its_prompt(tiny_onnx_dir, capsys):
    assert main(["generate", str(tiny_onnx_dir), "--prompt-ids", "1,2,3", "--prompt-ids", ",".join(["7"] * 30),
                 "--temperature", "0", "--max-new-tokens", "3", "--no-stream", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "--- 1,2,3 ---", out
    assert any(line.startswith("--- 7,7,7") and line.endswith("... ---") and len(line) <= 48 for line in lines), out
    assert err.startswith("\n") and SUMMARY.match(err.strip().splitlines()[-1]), err  # the summary on its own line


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


def _saved(model, folder):
    from model.checkpoints import save_model

    return save_model(model, folder)


def _exported_from(source_dir, out, source: str):
    """`export SOURCE --out OUT` in-process, without the parity check (the weights are saved copies of tested ones)."""
    from export.onnx import export_onnx
    from model import GPT

    return export_onnx(GPT.from_pretrained(str(source_dir)), out, source=source, validate=False).parent


def test_torch_reference_refuses_a_checkpoint_that_changed_since_the_export(tiny_model, tmp_path, monkeypatch, capsys):
    onnx = pytest.importorskip("onnx")
    from model import GPT
    from runtime.artifact import PREFIX

    ckpt = _saved(tiny_model, tmp_path / "ckpt")
    out = _exported_from(ckpt, tmp_path / "export", str(ckpt))
    # an export from before paths were recorded absolute: "ckpt", relative to where `export` ran
    old = tmp_path / "old"
    old.mkdir()
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    next(p for p in m.metadata_props if p.key == PREFIX + "source").value = "ckpt"
    onnx.save(m, str(old / "model.onnx"))
    (old / "model.onnx.data").write_bytes((out / "model.onnx.data").read_bytes())
    monkeypatch.chdir(tmp_path)

    gen = ["--backend", "torch", "--prompt-ids", "1,2", "--max-new-tokens", "2", "--json"]
    for export in (out, old):
        assert main(["generate", str(export), *gen]) == 0, capsys.readouterr().err
    _saved(GPT.from_pretrained("random:tiny@1"), ckpt)  # other weights where the export's checkpoint was
    for export in (out, old):
        assert main(["generate", str(export), *gen]) == 1
        err = capsys.readouterr().err
        assert f"error: {ckpt.resolve() / 'model.safetensors'} has changed since {export / 'model.onnx'}" in err, err
        assert "Give the torch backend the original checkpoint itself" in err and "or re-export" in err
    assert main(["generate", str(ckpt), *gen]) == 0  # the checkpoint given itself: what the user asked for


def test_verify_takes_a_hub_name_as_the_torch_reference(tiny_model, tmp_path, monkeypatch, capsys):
    import model.checkpoints as checkpoints

    hub = _saved(tiny_model, tmp_path / "hub-cache")  # stands in for the hub's gpt2 (no network in tests)
    out = _exported_from(hub, tmp_path / "export", "gpt2")
    monkeypatch.setattr(checkpoints, "_download_from_hub", lambda name: hub)
    fast = ["--text-tokens", "128", "--window", "64", "--greedy-tokens", "8", "--threads", "1"]
    for argv in ([str(out), "gpt2"], [str(out)]):  # given, and as the export recorded it
        assert main(["verify", *argv, *fast]) == 0, capsys.readouterr().err
        assert "verify passed: 1 targets match torch cpu fp32" in capsys.readouterr().err

    def offline(name):
        raise checkpoints.CheckpointError(f"could not get {name!r} from the Hugging Face hub (offline)")

    monkeypatch.setattr(checkpoints, "_download_from_hub", offline)
    assert main(["verify", str(out), *fast]) == 1
    err = capsys.readouterr().err
    assert "could not get 'gpt2' from the Hugging Face hub" in err and "not a checkpoint this machine" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["verify", "x", "--window", "0"], "argument --window: 0 is not a positive integer"),
    (["verify", "x", "--window", "-5"], "argument --window: -5 is not a positive integer"),
    (["verify", "x", "--greedy-tokens", "0"], "argument --greedy-tokens: 0 is not a positive integer"),
    (["verify", "x", "--text-tokens", "two"], "argument --text-tokens: 'two' is not an integer"),
    (["demo", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is not a positive integer"),
    (["serve", "x", "--port", "70000"], "argument --port: 70000 is not a TCP port; give 1..65535"),
    (["serve", "x", "--port", "-1"], "argument --port: -1 is not a TCP port"),
    (["serve", "x", "--port", "http"], "argument --port: 'http' is not an integer"),
])
def test_bad_counts_and_ports_are_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_verify_text_tokens_below_one_window_says_so(tiny_model, tokenizer):
    from runtime.tools.verify import VerifyError, token_windows

    with pytest.raises(VerifyError, match="--text-tokens 10 is less than one --window of 64 tokens"):
        token_windows(tokenizer, ["def f(x):\n    return x\n" * 50], tiny_model.config, 64, 10)


def test_demo_refuses_a_prompt_past_block_size_before_exporting(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--prompt", "x " * 400]) == 1
    err = capsys.readouterr().err
    assert "leaves no room to generate within this checkpoint's block_size" in err and "shorter --prompt" in err, err
    assert not (tmp_path / "demo").exists()  # refused before the export


BAD_NUMBERS = [  # (argv, the flag argparse names, the range it states)
    (["serve", "m", "--batch-window-ms", "inf"], "--batch-window-ms", "give 0..1000"),
    (["serve", "m", "--batch-window-ms", "nan"], "--batch-window-ms", "give 0..1000"),
    (["serve", "m", "--batch-window-ms", "1e12"], "--batch-window-ms", "give 0..1000"),
    (["serve", "m", "--request-timeout", "nan"], "--request-timeout", "give more than 0, up to 86400"),
    (["serve", "m", "--request-timeout", "0"], "--request-timeout", "give more than 0, up to 86400"),
    (["serve", "m", "--threads", "-4"], "--threads", "give 1..1024"),
    (["serve", "m", "--idle-timeout", "nan"], "--idle-timeout", "give more than 0, up to 300"),
    (["serve", "m", "--max-queue", "0"], "--max-queue", "give 1..65536"),
    (["generate", "m", "--threads", "-4"], "--threads", "give 1..1024"),
    (["generate", "m", "--temperature", "nan"], "--temperature", "give any finite number"),
    (["generate", "m", "--repetition-penalty", "inf"], "--repetition-penalty", "give any finite number"),
    (["generate", "m", "--seed", "-1"], "--seed", "give 0 or more"),
    (["demo", "--temperature", "inf"], "--temperature", "give any finite number"),
    (["demo", "--threads", "0"], "--threads", "give 1..1024"),
    (["bench", "m", "--warmup", "-1"], "--warmup", "give 0 or more"),
    (["bench", "m", "--threads", "-4"], "--threads", "give 1..1024"),
    (["verify", "m", "--threads", "-4"], "--threads", "give 1..1024"),
    (["build-engine", "m", "--workspace-gb", "nan"], "--workspace-gb", "give more than 0, up to 1024"),
    (["build-engine", "m", "--max-batch", "-1"], "--max-batch", "give 1 or more"),
]


@pytest.mark.parametrize("argv, flag, span", BAD_NUMBERS, ids=[" ".join(a[:1] + a[-2:]) for a, _, _ in BAD_NUMBERS])
def test_every_numeric_flag_is_checked_at_startup(capsys, argv, flag, span):
    # nan / inf / 1e12 once killed the scheduler thread or made every request wait for its timeout
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and flag in err and argv[-1] in err and span in err, err


def test_numeric_flags_accept_their_range(capsys):
    from runtime.cli import build_parser

    args = build_parser().parse_args(["serve", "m", "--batch-window-ms", "0", "--request-timeout", "0.5",
                                      "--threads", "4", "--max-body-bytes", "1024"])
    assert (args.batch_window_ms, args.request_timeout, args.threads) == (0.0, 0.5, 4)



LAZY = """import sys
from runtime.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'fastapi', 'uvicorn', 'onnx', 'onnxruntime'}})
others = sorted(m for m in sys.modules if m.startswith(('runtime.cli.', 'export.cli_')))
print(heavy, others)
"""


@pytest.mark.parametrize("command", ["generate", "serve", "bench", "verify", "export", "demo", "build-engine"])
def test_help_imports_only_the_chosen_subcommand(command):
    r = subprocess.run([sys.executable, "-c", LAZY.format(argv=[command, "--help"])], cwd=ROOT, text=True,
                       capture_output=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    module = COMMANDS[command][0]
    assert r.stdout.strip().splitlines()[-1] == f"[] {sorted({'runtime.cli.args', module})}", r.stdout[-2000:]


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    flags = re.split(r"\n  (?=-)", out.split("options:", 1)[1])  # one block per flag
    assert len(flags) > 20 and all(f.count("default") <= 1 for f in flags), [f for f in flags if f.count("default") > 1]
    text = " ".join(out.split())
    assert "TCP port, 1..65535 (default: 8000)" in text and "what runs MODEL (default: onnxruntime)" in text, text


BLOCK = """import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import torch` now raises ModuleNotFoundError, as in a `pip install '.[cpu]'`
from runtime.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("argv, blocked, hint", [
    (["export", "random:tiny", "--out", "{tmp}/x"], ["torch"], ["pip install torch==2.13.0", "nanogpt-deploy[export]"]),
    (["demo", "--out", "{tmp}/demo"], ["torch"], ["pip install torch==2.13.0", "nanogpt-deploy[export]"]),
    (["export", "random:tiny", "--out", "{tmp}/x"], ["onnxscript"], ["nanogpt-deploy[export]"]),
])
def test_a_missing_dependency_names_its_extra_not_a_traceback(tmp_path, argv, blocked, hint):
    argv = [a.format(tmp=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, "-c", BLOCK.format(blocked=blocked, argv=argv)], cwd=ROOT, text=True,
                       capture_output=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("[")]  # "[  1.9s] loading ..." stages
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    assert lines[0].startswith(f"error: {argv[0]} needs {blocked[0]}, which is not installed") and \
        all(h in lines[0] for h in hint), lines[0]
