"""Other tools run an export as it is written: Hugging Face optimum (`ORTModelForCausalLM.generate`) and
onnxruntime-genai (`og.Generator`), greedy, one prompt and a padded batch, tokens equal to this project's runtime;
the GPT-2 tokenizer files derived from the local ranks encode and decode exactly as tiktoken; `--logits last`
picks each row's last real token (left and right padding); a `--kv-cache shared` export does not present itself
to optimum (which left-pads, and GroupQueryAttention reads the mask as right padding) but runs right in genai.

The tools' tests skip, naming the error, where a tool does not import (`pip install -e '.[test]'` installs them).
The model is the tiny random one with its matrices scaled by 6: sharper logits, so greedy tokens vary and depend
on the whole context instead of repeating one token.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

N_NEW = 10
# prompt ids inside the tiny model's vocab (512); 511 stands in for <|endoftext|> (50256 is outside it)
PROMPTS = [[5, 77, 300, 12, 9, 401, 250], [34, 200, 7], [88, 1, 413, 260, 99]]
TINY_EOT = 511


@pytest.fixture(scope="module")
def sharp_model():
    from model import GPT

    m = GPT.from_pretrained("random:tiny@0").eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return m


@pytest.fixture(scope="module")
def exports(tmp_path_factory, sharp_model):
    """{(kv_cache, logits): DIR} of the sharpened tiny model."""
    from export.onnx import export_onnx

    out = {}
    for kv, logits in (("concat", "all"), ("concat", "last"), ("concat", "last:3"), ("shared", "last")):
        d = tmp_path_factory.mktemp(f"eco_{kv}_{logits.replace(':', '')}")
        export_onnx(sharp_model, d, kv_cache=kv, logits=logits)
        out[kv, logits] = d
    return out


def runtime_tokens(folder, prompts) -> list[list[int]]:
    """The project's own runtime: greedy, prompts left-padded into one batch."""
    from runtime.backends import load_backend
    from runtime.generation import SamplingParams, generate

    be = load_backend("onnxruntime", str(folder))
    cs = generate(be, None, prompts, SamplingParams(temperature=0, max_new_tokens=N_NEW, stop_token_ids=()))
    return [c.token_ids for c in cs]


def check_same(tool: str, got, want) -> None:
    bad = [f"row {b}: {tool} {g}, runtime {w}" for b, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not bad and len(got) == len(want), f"{tool} differs from the project's runtime: " + "; ".join(bad)


# ---------------------------------------------------------------------------------- files an export writes

def test_every_export_writes_the_tool_files_and_no_tool_files_leaves_them_out(tmp_path, tiny_model, exports):
    from export.ecosystem import TOOL_FILES
    from export.onnx import export_onnx

    concat = sorted(os.listdir(exports["concat", "all"]))
    assert concat == sorted(["model.onnx", "model.onnx.data", *TOOL_FILES]), concat
    cfg = json.loads((exports["concat", "all"] / "config.json").read_text())
    assert (cfg["model_type"], cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]) == \
        ("gpt2", 2, 4, 64, 512, 128)
    genai = json.loads((exports["concat", "all"] / "genai_config.json").read_text())
    assert genai["model"]["type"] == "decoder" and genai["search"]["past_present_share_buffer"] is False
    # shared: genai's in-place buffer, and no optimum/transformers config (module docstring of export/ecosystem.py)
    shared = set(os.listdir(exports["shared", "last"]))
    assert "config.json" not in shared and "generation_config.json" not in shared and "tokenizer.json" in shared
    genai = json.loads((exports["shared", "last"] / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True

    out = tmp_path / "out"
    export_onnx(tiny_model, out, validate=False)
    export_onnx(tiny_model, out, validate=False, tool_files=False)  # over a previous export: no --force needed
    assert sorted(os.listdir(out)) == ["model.onnx", "model.onnx.data"], "stale tool files must go"
    export_onnx(tiny_model, out, validate=False, kv_cache="shared")
    assert "config.json" not in os.listdir(out) and "genai_config.json" in os.listdir(out)


def test_cli_no_tool_files(tmp_path, capsys):
    from runtime import cli

    assert cli.main(["export", "random:tiny", "--out", str(tmp_path / "a"), "--no-tool-files", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["tool_files"] == [] and sorted(os.listdir(tmp_path / "a")) == ["model.onnx", "model.onnx.data"]


# ---------------------------------------------------------------------------------- tokenizer files

def sample_texts(n: int = 3000, seed: int = 0) -> list[str]:
    """Hand-picked edge cases plus random strings over letters, digits, punctuation, whitespace runs, accents,
    CJK, emoji (with modifiers and ZWJ), combining marks, contractions and <|endoftext|>."""
    fixed = ["", " ", "  ", "\n", "\n\n\n", "\t \t", " \r\n ", "Hello world", "Hello  world  ", "  leading",
             "trailing   ", "<|endoftext|>", "a<|endoftext|>b", " <|endoftext|> ", "<|endoftext", "|endoftext|>",
             "naïve café", "日本語のテキスト", "😀 🤖🏽 👨‍👩‍👧", "e\u0301\u0301", "\u00a0nbsp\u2003em\u3000ideo",
             "'s 've 're 'll 'd 'm 't 'S 'LL", "don't I'll we've", "x = [1, 2, 3]  # comment\n    return   x\r\n",
             "1234567890 3.14159 1e-10", "!!!???...,,,", "\x00\x01\x7f", "ÿþ\ufeffBOM", "Ünïcödé ÀÉÎÕÜ", "\u200b\u200d"]
    pool = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") + list(" " * 12 + "\n\n\t\r")
            + list(".,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`") + list("éèàçñöüßøåÆŒ") + list("日本語中文한국어ไทยع")
            + ["😀", "🤖", "🏽", "\u200d", "\u0301", "\u00a0", "'s", "'ll", " ", "  ", "   ", "<|endoftext|>", "def ",
               "    ", "\n\n"])
    rng = np.random.default_rng(seed)
    texts = list(fixed)
    while len(texts) < n:
        texts.append("".join(rng.choice(pool, size=int(rng.integers(1, 40)))))
    return texts


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    from export.hf_tokenizer import gpt2_tokenizer_files

    d = tmp_path_factory.mktemp("hf_tok")
    for name, data in gpt2_tokenizer_files().items():
        (d / name).write_bytes(data)
    return d


def test_tokenizer_files_encode_and_decode_as_tiktoken(hf_tokenizer_dir, tokenizer):
    transformers = pytest.importorskip("transformers")

    texts = sample_texts()
    want = [tokenizer.encode(t, allowed_special="all") for t in texts]
    for name, tok in (("tokenizer.json", transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_tokenizer_dir / "tokenizer.json"))),
                      ("folder", transformers.GPT2TokenizerFast.from_pretrained(hf_tokenizer_dir))):
        got = tok(texts)["input_ids"]
        bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
        assert not bad, f"{name}: {len(bad)} of {len(texts)} texts encode differently from tiktoken, e.g. {bad[:3]}"
        dec = tok.batch_decode(want)
        bad = [(t, d) for t, w, d in zip(texts, want, dec) if d != tokenizer.decode(w)]
        assert not bad, f"{name}: {len(bad)} of {len(texts)} decode differently from tiktoken, e.g. {bad[:3]}"
    fast = transformers.GPT2TokenizerFast.from_pretrained(hf_tokenizer_dir)
    assert (len(fast), fast.eos_token_id, fast.bos_token_id, fast.pad_token_id) == (50257, 50256, 50256, 50256)
    slow = transformers.GPT2Tokenizer.from_pretrained(hf_tokenizer_dir)  # vocab.json + merges.txt
    bad = [t for t, w in zip(texts[:300], want) if slow.encode(t) != w]
    assert not bad, f"GPT2Tokenizer (vocab.json + merges.txt): {len(bad)} of 300 differ, e.g. {bad[:3]}"


def test_tokenizer_files_match_gpt2s_layout(hf_tokenizer_dir):
    merges = (hf_tokenizer_dir / "merges.txt").read_text().splitlines()
    vocab = json.loads((hf_tokenizer_dir / "vocab.json").read_text())
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 50000 and merges[1] == "Ġ t"  # GPT-2's first merge
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256 and vocab["!"] == 0 and vocab["Ġthe"] == 262


def test_tokenizer_files_written_to_a_folder(tmp_path, hf_tokenizer_dir, capsys):
    from export.hf_tokenizer import TOKENIZER_FILES, main

    assert main([str(tmp_path / "hf")]) == 0  # what scripts/compare_peers.py runs before the GGUF / CT2 converters
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted(TOKENIZER_FILES)
    for name in TOKENIZER_FILES:
        assert (tmp_path / "hf" / name).read_bytes() == (hf_tokenizer_dir / name).read_bytes(), name
    assert "wrote 5 tokenizer files" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- logits last

@pytest.mark.parametrize("keep", [1, 3])
def test_logits_last_picks_each_rows_last_real_token(tiny_model, keep):
    """Left padding, right padding and none: the positions ending at each row's last real token."""
    T = 6
    ids = torch.randint(0, 512, (4, T), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full, _ = tiny_model(ids, mask, pos)
        got, _ = tiny_model(ids, mask, pos, logits_to_keep=keep)
    assert got.shape == (4, keep, 512)
    for b in range(4):
        last = int(mask[b].nonzero().max())
        lo = max(0, last + 1 - keep)  # a row with fewer positions than `keep` up to its last: the first `keep`
        d = float((got[b] - full[b, lo:lo + keep]).abs().max())
        assert d == 0.0, f"row {b} (mask {mask[b].tolist()}), keep {keep}: max|Δ|={d:.2e} vs positions {lo}..{lo + keep - 1}"
    with torch.no_grad():  # unpadded: exactly the old slice
        plain, _ = tiny_model(ids, logits_to_keep=keep)
        assert torch.equal(plain, tiny_model(ids)[0][:, -keep:])


@pytest.mark.parametrize("logits", ["last", "last:3"])
def test_logits_last_graph_is_right_for_right_padding(exports, sharp_model, logits):
    from export.check import new_session

    k = 1 if logits == "last" else 3
    session = new_session(exports["concat", logits] / "model.onnx")
    ids = np.array([[5, 77, 300, 12, 9, 401], [34, 200, 7, 0, 0, 0]])
    mask = np.array([[1] * 6, [1, 1, 1, 0, 0, 0]])
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.clip(np.cumsum(mask, -1) - 1, 0, None)}
    for i in range(2):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((2, 4, 0, 16), np.float32)
    got = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        full = sharp_model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(feeds["position_ids"]))[0]
    for b, last in ((0, 5), (1, 2)):
        d = float(np.abs(got[b] - full[b, last + 1 - k:last + 1].numpy()).max())
        assert d <= 1e-4, f"{logits}, row {b}: max|Δ|={d:.2e} vs torch at positions ending at {last}"


# ---------------------------------------------------------------------------------- optimum

@pytest.fixture(scope="module")
def ort_model_for_causal_lm():
    try:
        from optimum.onnxruntime import ORTModelForCausalLM
    except Exception as e:  # noqa: BLE001 - a version mismatch raises ImportError, AttributeError, ...
        pytest.skip(f"optimum's ORTModelForCausalLM does not import ({type(e).__name__}: {e}); "
                    f"pip install -e '.[test]'")
    return ORTModelForCausalLM


def optimum_tokens(cls, folder, prompts, io_binding: bool) -> list[list[int]]:
    """optimum generate(), greedy, prompts left-padded (pad id 0: the tiny vocab has no <|endoftext|>)."""
    model = cls.from_pretrained(folder, use_io_binding=io_binding)
    L = max(map(len, prompts))
    ids = torch.zeros((len(prompts), L), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):], mask[b, L - len(p):] = torch.tensor(p), 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                         do_sample=False, pad_token_id=0)
    return out[:, L:].tolist()


@pytest.mark.parametrize("logits", ["all", "last"])
def test_optimum_generates_the_runtimes_tokens(ort_model_for_causal_lm, exports, logits):
    folder = exports["concat", logits]
    for prompts in (PROMPTS[:1], PROMPTS):
        want = runtime_tokens(folder, prompts)
        for io_binding in (False, True):
            check_same(f"optimum (logits {logits}, io_binding {io_binding}, batch {len(prompts)})",
                       optimum_tokens(ort_model_for_causal_lm, folder, prompts, io_binding), want)


def test_optimum_does_not_open_a_shared_cache_export(ort_model_for_causal_lm, exports):
    with pytest.raises(Exception, match="(?i)library name|config"):
        ort_model_for_causal_lm.from_pretrained(exports["shared", "last"])


# ---------------------------------------------------------------------------------- onnxruntime-genai

@pytest.fixture(scope="module")
def og():
    try:
        import onnxruntime_genai
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"onnxruntime-genai does not import ({type(e).__name__}: {e}); pip install -e '.[test]'")
    return onnxruntime_genai


def genai_tokens(og, folder, prompts) -> list[list[int]]:
    """onnxruntime-genai's Generator, greedy, prompts right-padded (as genai pads) with its pad id."""
    cfg_path = folder / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    # the tiny vocab (512) has no <|endoftext|> (50256), which genai range-checks: 511 stands in for it here
    cfg["model"]["eos_token_id"] = cfg["model"]["pad_token_id"] = TINY_EOT
    cfg_path.write_text(json.dumps(cfg))
    model = og.Model(str(folder))
    L = max(map(len, prompts))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=L + N_NEW, do_sample=False, batch_size=len(prompts))
    gen = og.Generator(model, params)
    ids = np.full((len(prompts), L), TINY_EOT, np.int32)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [gen.get_sequence(b).tolist()[L:] for b in range(len(prompts))]


@pytest.mark.parametrize("export", [("concat", "all"), ("concat", "last"), ("shared", "last")],
                         ids=["concat-all", "concat-last", "shared-last"])
def test_genai_generates_the_runtimes_tokens(og, exports, export):
    folder = exports[export]
    for prompts in (PROMPTS[:1], PROMPTS):
        want = runtime_tokens(folder, prompts)
        assert not any(TINY_EOT in w for w in want), f"the reference generated the stand-in eos {TINY_EOT}: {want}"
        check_same(f"onnxruntime-genai ({export}, batch {len(prompts)})", genai_tokens(og, folder, prompts), want)


def test_genai_tokenizer_reads_the_tokenizer_files(og, exports):
    """onnxruntime-genai's own tokenizer (onnxruntime-extensions) on the derived files encodes as tiktoken; it drops
    ASCII control characters, which tiktoken keeps, so those texts are left out."""
    from runtime.tokenizer import load_tokenizer

    enc, tok = load_tokenizer(), og.Tokenizer(og.Model(str(exports["concat", "all"])))
    texts = [t for t in sample_texts(1000) if not any(ord(c) < 32 and c not in "\t\n\r" or c == "\x7f" for c in t)]
    bad = [(t, g, w) for t in texts
           if (g := tok.encode(t).tolist()) != (w := enc.encode(t, allowed_special="all"))]
    assert not bad, f"{len(bad)} of {len(texts)} texts encode differently from tiktoken, e.g. {bad[:3]}"
