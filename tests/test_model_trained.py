"""The embedded demo model (model/weights/pycode) and the script that trains it (scripts/train_tiny.py).

The model tests check it learned Python: held-out stdlib perplexity far below chance, Python's
usual tokens among the top 5 after keywords, and a greedy "def " that names a function. The script test
trains a 1-layer model for a few iterations on a handful of stdlib files, resumes it, and checks the resumed
run is bit-identical to an uninterrupted one. All run in seconds on CPU.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
PYCODE = ROOT / "model" / "weights" / "pycode"
MAX_BYTES = 16 * 1024 * 1024
# measured 3.47 (ppl 32) on these windows; chance is ln(50257) = 10.8 (ppl 50257), half of it 5.4
MAX_HELDOUT_LOSS = 4.0  # ppl 55


@pytest.fixture(scope="module")
def pycode():
    from model import GPT

    return GPT.from_pretrained(PYCODE)


@pytest.fixture(scope="module")
def enc():
    from runtime.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def train_tiny():
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "scripts" / "train_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_checkpoint_is_small_and_loads(pycode):
    size = sum(f.stat().st_size for f in PYCODE.iterdir() if f.name in ("config.json", "model.safetensors"))
    assert size <= MAX_BYTES, f"pycode checkpoint is {size / 2**20:.1f} MiB > {MAX_BYTES / 2**20:.0f} MiB"
    c = pycode.config
    assert (c.vocab_size, c.real_vocab_size, c.tokenizer) == (50257, 50257, "gpt2")
    corpus = json.loads((PYCODE / "corpus.json").read_text())
    assert corpus["training"]["params"] == pycode.num_params()


def heldout_windows(enc, block_size: int, n: int = 16) -> torch.Tensor:
    """`n` evenly spaced (block_size + 1)-token windows of the validation split, as the training script's eval.

    The files are read from the running interpreter's stdlib; on the training Python (see corpus.json)
    these are exactly the held-out tokens, elsewhere nearly so.
    """
    corpus = json.loads((PYCODE / "corpus.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids = []
    for rel in corpus["val_files"]:
        if (stdlib / rel).is_file():
            ids += enc.encode_ordinary((stdlib / rel).read_text(encoding="utf-8", errors="replace")) + [enc.eot_token]
    if len(ids) < 10 * block_size:
        pytest.skip(f"only {len(ids)} tokens of the model's validation files exist under {stdlib}")
    data = torch.tensor(ids)
    starts = torch.linspace(0, data.numel() - block_size - 2, n).long()
    return torch.stack([data[s:s + block_size + 1] for s in starts])  # (n, T+1)


def test_heldout_perplexity_far_below_chance(pycode, enc):
    windows = heldout_windows(enc, pycode.config.block_size)
    with torch.no_grad():
        logits, _ = pycode(windows[:, :-1])  # (n, T, vocab)
        losses = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(1)  # (n,)
    loss = losses.mean().item()
    chance = math.log(pycode.config.vocab_size)
    assert loss < MAX_HELDOUT_LOSS, (f"held-out loss {loss:.3f} (ppl {math.exp(loss):.1f}) >= {MAX_HELDOUT_LOSS} "
                                     f"(chance {chance:.2f}, ppl {pycode.config.vocab_size}); "
                                     f"per window {[round(v, 2) for v in losses.tolist()]}")


@pytest.mark.parametrize("prompt, expected", [
    ("    def __init__(self", {",", "):"}),
    ("class Foo(object", {"):"}),
    ("        return", {" self", " None"}),
    ("        if x is", {" not", " None"}),
    ("    def", {" _", " __"}),
])
def test_next_token_is_python(pycode, enc, prompt, expected):
    with torch.no_grad():
        logits, _ = pycode(torch.tensor([enc.encode_ordinary(prompt)]))
    top5 = [enc.decode([i]) for i in torch.topk(logits[0, -1], 5).indices.tolist()]
    assert expected <= set(top5), f"top-5 after {prompt!r} is {top5}, expected to include {sorted(expected)}"


def test_greedy_def_names_a_function(pycode, enc, train_tiny):
    ids, allowed = train_tiny.heal_prompt(enc, enc.encode_ordinary("def "))  # "def" + a " name" token
    new = train_tiny.sample(pycode, ids, max_new_tokens=20, top_k=1, temperature=1.0, seed=0, allowed_first=allowed)
    text = enc.decode(ids + new)
    name = text.removeprefix("def ").split("(")[0].split(",")[0].split(":")[0].split("\n")[0]
    assert name.isidentifier(), f"greedy continuation of 'def ' does not name a function: {text!r}"


def run_script(train_tiny, tmp_path: Path, *extra: str) -> None:
    train_tiny.main([
        "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "2",
        "--max-files", "4", "--eval-windows", "4", "--eval-interval", "3", "--ckpt-interval", "2",
        "--warmup-iters", "2", "--cache-dir", str(tmp_path / "cache"), "--no-progress", *extra])


def test_train_script_trains_and_resumes_exactly(train_tiny, tmp_path, monkeypatch):
    from model import GPT

    run_script(train_tiny, tmp_path, "--max-iters", "6", "--out-dir", str(tmp_path / "full"),
               "--ckpt-dir", str(tmp_path / "full_ckpt"))

    # the same run, killed right after its iteration-4 checkpoint, then resumed
    save = train_tiny.save_checkpoint

    def save_then_crash(path, model, optimizer, it, *rest):
        save(path, model, optimizer, it, *rest)
        if it == 4:
            raise KeyboardInterrupt("simulated crash after the iteration-4 checkpoint")

    monkeypatch.setattr(train_tiny, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_script(train_tiny, tmp_path, "--max-iters", "6", "--out-dir", str(tmp_path / "part"),
                   "--ckpt-dir", str(tmp_path / "part_ckpt"))
    monkeypatch.setattr(train_tiny, "save_checkpoint", save)
    ckpt = torch.load(tmp_path / "part_ckpt" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["iter"] == 4 and set(ckpt) >= {"model", "optimizer", "rng", "args", "config"}
    assert not (tmp_path / "part").exists()
    train_tiny.main(["--resume", str(tmp_path / "part_ckpt"), "--out-dir", str(tmp_path / "resumed")])
    ckpt = torch.load(tmp_path / "part_ckpt" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["iter"] == 6

    full = GPT.from_pretrained(tmp_path / "full")
    resumed = GPT.from_pretrained(tmp_path / "resumed")
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        d = (a - b).abs().max().item()
        assert d == 0, f"{name}: resumed run differs from the uninterrupted one, max|Δ|={d:.2e}"
    corpus = json.loads((tmp_path / "full" / "corpus.json").read_text())
    assert (corpus["train"]["files"], corpus["val"]["files"], corpus["training"]["iters"]) == (4, 1, 6)
    # the training checkpoint also loads as a nanoGPT ckpt.pt
    assert GPT.from_pretrained(tmp_path / "full_ckpt" / "ckpt.pt").num_params() == full.num_params()


def test_max_minutes_stops_and_saves(train_tiny, tmp_path):
    run_script(train_tiny, tmp_path, "--max-iters", "6", "--max-minutes", "1e-9", "--out-dir", str(tmp_path / "out"),
               "--ckpt-dir", str(tmp_path / "ckpt"))
    corpus = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert corpus["training"]["stopped_by_time_budget"] and corpus["training"]["iters"] == 0
