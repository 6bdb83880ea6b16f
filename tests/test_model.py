"""The torch model: parity with transformers' GPT2LMHeadModel, KV cache, left padding, checkpoint loading."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from model import GPT, GPTConfig
from model.checkpoints import CheckpointError, save_model, state_shapes


def _hf_gpt2(tmp_path, **cfg):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(**cfg)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)
    return hf


def _assert_close(name, a, b, atol):
    d = (a.double() - b.double()).abs().max().item()
    assert d <= atol, f"{name}: max|Δ|={d:.2e} > {atol}"


def test_config_json_round_trip_and_no_torch_import():
    cfg = GPTConfig.preset("gpt2")
    assert GPTConfig.from_json(cfg.to_json()) == cfg
    assert cfg.head_dim == 64 and cfg.real_vocab_size == 50257
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None\n"
            "from model.config import GPTConfig; import model; print(model.GPTConfig.preset('tiny').n_layer)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert r.returncode == 0 and r.stdout.strip() == "2", r.stderr
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("gpt5")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=65, n_head=4)
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({"n_layers": 3})


def test_gpt2_param_count_and_tied_weights():
    m = GPT(GPTConfig.preset("gpt2"))
    assert m.num_params() == 124_439_808  # GPT-2 small, lm_head tied to wte
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("act,gelu", [("gelu_new", "tanh"), ("gelu", "exact")])
def test_parity_with_transformers_tiny(tmp_path, act, gelu):
    hf = _hf_gpt2(tmp_path, n_layer=2, n_head=4, n_embd=64, vocab_size=512, n_positions=128, activation_function=act)
    m = GPT.from_pretrained(tmp_path)
    assert m.config.gelu == gelu
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _assert_close("logits vs GPT2LMHeadModel", m(ids)[0], hf(ids).logits, 1e-4)


@pytest.mark.slow
def test_parity_with_transformers_124m_shape(tmp_path):
    hf = _hf_gpt2(tmp_path)  # GPT-2 small shape, random weights
    m = GPT.from_pretrained(tmp_path)
    assert m.num_params() == 124_439_808
    ids = torch.randint(0, 50257, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _assert_close("124M logits vs GPT2LMHeadModel", m(ids)[0], hf(ids).logits, 1e-4)


@pytest.mark.parametrize("chunks", [[1] * 12, [3, 3, 3, 3], [9, 1, 1, 1], [5, 7]])
def test_kv_cache_equals_full_recompute(tiny_model, chunks):
    ids = torch.randint(0, 512, (2, sum(chunks)), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = tiny_model(ids)
        past, outs, t = None, [], 0
        for n in chunks:
            logits, past = tiny_model(ids[:, t:t + n], past=past)
            outs.append(logits)
            t += n
    assert past[0][0].shape == (2, 4, sum(chunks), 16)
    _assert_close(f"incremental {chunks}", torch.cat(outs, 1), full, 1e-5)


def test_left_padded_batch_equals_each_prompt_alone(tiny_model):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=g) for n in (9, 4, 1)]
    L = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(L - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(L - len(p)), torch.ones(len(p))]).long() for p in prompts])
    nxt = torch.randint(0, 512, (3, 1), generator=g)
    with torch.no_grad():
        batch_logits, past = tiny_model(ids, attention_mask=mask)
        step_logits, _ = tiny_model(nxt, attention_mask=torch.cat([mask, torch.ones(3, 1).long()], 1), past=past)
        assert not torch.isnan(batch_logits).any() and not torch.isnan(step_logits).any()
        assert not any(torch.isnan(t).any() for kv in past for t in kv)
        for i, p in enumerate(prompts):
            alone, _ = tiny_model(torch.cat([p, nxt[i]])[None])
            _assert_close(f"row {i} prefill", batch_logits[i, L - len(p):], alone[0, :-1], 1e-5)
            _assert_close(f"row {i} decode", step_logits[i, 0], alone[0, -1], 1e-5)


def test_fully_padded_row_has_no_nan(tiny_model):
    ids = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    with torch.no_grad():
        logits, past = tiny_model(ids, attention_mask=mask)
    assert torch.isfinite(logits).all() and all(torch.isfinite(t).all() for kv in past for t in kv)


def _nanogpt_ckpt(path, model: GPT, vocab_pad: int | None = None, compiled: bool = False):
    """Write a checkpoint the way nanoGPT's train.py does (state dict with both tied keys, model_args, optimizer...)."""
    c = model.config
    state = model.state_dict()
    if compiled:
        state = {"_orig_mod." + k: v for k, v in state.items()}
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                      bias=c.bias, vocab_size=c.vocab_size, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.save({"model": state, "optimizer": opt.state_dict(), "model_args": model_args, "iter_num": 100,
                "best_val_loss": torch.tensor(2.5), "config": {"dataset": "shakespeare_char", "compile": compiled}},
               path)


@pytest.mark.parametrize("compiled", [False, True])
def test_nanogpt_ckpt_loads_and_matches(tmp_path, tiny_model, compiled):
    path = tmp_path / "ckpt.pt"
    _nanogpt_ckpt(path, tiny_model, compiled=compiled)
    m = GPT.from_pretrained(path)
    assert m.config.gelu == "exact" and m.config.n_layer == 2
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        _assert_close("ckpt.pt reload", m(ids)[0], tiny_model(ids)[0], 0)


def test_nanogpt_ckpt_model_args_may_name_gelu_and_real_vocab(tmp_path, tiny_model):
    path = tmp_path / "ckpt.pt"
    c = tiny_model.config
    args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size, bias=True,
                vocab_size=c.vocab_size, dropout=0.0, gelu="tanh", real_vocab_size=500)
    torch.save({"model": tiny_model.state_dict(), "model_args": args}, path)
    m = GPT.from_pretrained(path)
    assert m.config.gelu == "tanh" and m.config.real_vocab_size == 500


def test_nanogpt_padded_vocab_records_real_vocab(tmp_path):
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50304, gelu="exact")
    src = GPT(cfg).init_weights(0)
    _nanogpt_ckpt(tmp_path / "ckpt.pt", src)
    m = GPT.from_pretrained(tmp_path / "ckpt.pt")
    assert m.config.vocab_size == 50304 and m.config.real_vocab_size == 50257


def test_native_folder_round_trip(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["n_layer"] == 2
    m = GPT.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 512, (1, 5))
    with torch.no_grad():
        _assert_close("native folder reload", m(ids)[0], tiny_model(ids)[0], 0)


def test_random_is_explicit_and_seeded():
    a, b = GPT.from_pretrained("random:tiny@7"), GPT.from_pretrained("random:tiny@7")
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    with pytest.raises(CheckpointError, match="unknown preset"):
        GPT.from_pretrained("random:nope")


class _Evil:
    """Unpickling it runs `touch MARKER` (MARKER: a path in the test's own tmp_path)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_bad_inputs_give_clear_errors(tmp_path, tiny_model, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        GPT.from_pretrained(tmp_path / "nope" / "ckpt.pt")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        GPT.from_pretrained("out/typo")  # a mistyped folder under a local one, not a hub repo 'out/typo'
    junk = tmp_path / "junk.pt"
    junk.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a torch checkpoint"):
        GPT.from_pretrained(junk)
    # a pickle that would run code: refused, and nothing ran
    import os
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Evil(marker), "model_args": {}}, evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        GPT.from_pretrained(evil)
    assert not os.path.exists(marker)
    raw = tmp_path / "raw.pt"
    with open(raw, "wb") as f:
        pickle.dump(_Evil(marker), f)
    with pytest.raises(CheckpointError):
        GPT.from_pretrained(raw)
    assert not os.path.exists(marker)
    # wrong shape: names file and key
    state = tiny_model.state_dict()
    state["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pt"
    torch.save({"model": state, "model_args": dict(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=512)},
               bad)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*transformer\.h\.0\.mlp\.c_fc\.weight: checkpoint \(3, 3\)"):
        GPT.from_pretrained(bad)
    # missing keys
    del state["transformer.h.1.attn.c_attn.weight"]
    state["transformer.h.0.mlp.c_fc.weight"] = tiny_model.state_dict()["transformer.h.0.mlp.c_fc.weight"]
    torch.save({"model": state, "model_args": dict(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=512)},
               bad)
    with pytest.raises(CheckpointError, match="missing keys.*h.1.attn.c_attn.weight"):
        GPT.from_pretrained(bad)
    # truncated safetensors in a folder
    save_model(tiny_model, tmp_path / "trunc")
    f = tmp_path / "trunc" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        GPT.from_pretrained(tmp_path / "trunc")
    # a dict that is not a nanoGPT checkpoint
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not a nanoGPT checkpoint"):
        GPT.from_pretrained(other)


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="random:gpt2|nanogpt-deploy\\[hub\\]"):
        GPT.from_pretrained("gpt2")


@pytest.mark.parametrize("k", [1, 3])
def test_logits_to_keep_is_the_last_rows_of_the_full_logits(tiny_model, k):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, present = tiny_model(ids)
        last, present_k = tiny_model(ids, logits_to_keep=k)
        # decode step on the cache: the one new position either way
        step = ids[:, :1]
        mask = torch.ones(2, 8, dtype=torch.int64)
        d_full, _ = tiny_model(step, mask, torch.full_like(step, 7), present)
        d_last, _ = tiny_model(step, mask, torch.full_like(step, 7), present, logits_to_keep=1)
    assert last.shape == (2, k, tiny_model.config.vocab_size)
    d = (last - full[:, -k:]).abs().max().item()
    assert d <= 1e-5, f"logits_to_keep={k}: max|Δ|={d:.2e} > 1e-5"
    for (a, b), (c, e) in zip(present, present_k):  # the cache is the same whatever is kept
        assert torch.equal(a, c) and torch.equal(b, e)
    assert torch.equal(d_last, d_full)


def test_untied_hf_checkpoint_is_refused(tmp_path):
    # this model ties wte and lm_head (as GPT-2): an untied head must not silently replace the embedding
    _hf_gpt2(tmp_path, n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16, tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match="untied lm_head.*tied"):
        GPT.from_pretrained(tmp_path)


def test_untied_config_with_equal_weights_loads(tmp_path):
    # tie_word_embeddings=False but wte == lm_head (e.g. a tied model saved untied): loads, parity with transformers
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16,
                                  tie_word_embeddings=False)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        hf.lm_head.weight.copy_(hf.transformer.wte.weight)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _assert_close("logits vs GPT2LMHeadModel", GPT.from_pretrained(tmp_path)(ids)[0], hf(ids).logits, 1e-4)


@pytest.mark.parametrize("option,value", [("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True),
                                          ("add_cross_attention", True), ("n_inner", 100)])
def test_hf_config_options_that_change_the_math_are_refused(tmp_path, option, value):
    _hf_gpt2(tmp_path, n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16, **{option: value})
    with pytest.raises(CheckpointError, match=rf"config\.json: {option}={value}"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("option,value", [("reorder_and_upcast_attn", True), ("layer_norm_epsilon", 1e-2)])
def test_hf_config_options_honoured(tmp_path, option, value):
    # reorder_and_upcast_attn only reorders the scaling and upcasts under fp16 autocast: fp32 logits are the
    # same (bit-equal in transformers 5.23, eager attention); layer_norm_epsilon is the model's layer_norm_eps
    hf = _hf_gpt2(tmp_path, n_layer=2, n_head=4, n_embd=64, vocab_size=512, n_positions=128,
                  attn_implementation="eager", **{option: value})
    m = GPT.from_pretrained(tmp_path)
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _assert_close(f"{option}={value} logits vs GPT2LMHeadModel", m(ids)[0], hf(ids).logits, 1e-4)


def test_hf_config_aliases_honoured_and_bad_values_refused(tmp_path):
    # transformers also reads num_attention_heads etc. (GPT2Config.attribute_map); so does the loader
    hf = _hf_gpt2(tmp_path, n_layer=2, n_head=4, n_embd=64, vocab_size=512, n_positions=128)
    cfg_path = tmp_path / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["num_attention_heads"] = raw.pop("n_head")
    cfg_path.write_text(json.dumps(raw))
    m = GPT.from_pretrained(tmp_path)
    assert m.config.n_head == 4
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _assert_close("logits vs GPT2LMHeadModel", m(ids)[0], hf(ids).logits, 1e-4)
    cfg_path.write_text(json.dumps({**raw, "num_attention_heads": 5}))
    with pytest.raises(CheckpointError,
                       match=r"config\.json: does not describe a GPT-2: n_embd \(64\) must be divisible"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("ckpt", [
    {"model": {}, "model_args": None},
    {"model": {}, "model_args": [1, 2]},
    {"model": {}, "model_args": {"n_layer": None, "n_head": 4, "n_embd": 64}},
    {"model": {}, "model_args": {"vocab_size": None}},
    {"model": {}, "model_args": {"n_layer": 2.0, "n_head": 4, "n_embd": 64}},
    {"model": None, "model_args": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 128, "vocab_size": 512}},
    {0: torch.zeros(1), "model": {}},  # mixed-type keys, no model_args
])
def test_malformed_nanogpt_ckpt_is_a_checkpoint_error(tmp_path, ckpt):
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"ckpt\.pt.*(model_args|'model'|not a nanoGPT checkpoint)"):
        GPT.from_pretrained(path)


def test_non_checkpoint_file_is_not_called_unsafe(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    (tmp_path / "empty.pt").write_bytes(b"")
    good = tmp_path / "good.pt"
    torch.save({"model": {}, "model_args": {}}, good)
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:40])
    for name in ("model.onnx", "empty.pt", "trunc.pt"):
        with pytest.raises(CheckpointError, match="is not a torch checkpoint") as err:
            GPT.from_pretrained(tmp_path / name)
        assert "run code" not in str(err.value), str(err.value)
    with pytest.raises(CheckpointError, match="model.onnx is an export"):
        GPT.from_pretrained(tmp_path / "model.onnx")
    # a protocol-2 pickle (torch's legacy format) naming os.system: still refused as unsafe, nothing ran
    import os
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil2.pt"
    with open(evil, "wb") as f:
        pickle.dump(_Evil(marker), f, protocol=2)
    with pytest.raises(CheckpointError, match="refusing to load.*could run code"):
        GPT.from_pretrained(evil)
    assert not os.path.exists(marker)


def test_state_shapes_match_the_module_without_building_it():
    for cfg in (GPTConfig.preset("tiny"), GPTConfig.preset("tiny", bias=False)):
        built = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items() if k != "transformer.wte.weight"}
        assert state_shapes(cfg) == built, set(state_shapes(cfg).items()) ^ set(built.items())


def _huge_config_checkpoints(tmp_path, tiny_model):
    """A nanoGPT ckpt.pt and an HF folder holding the tiny model's weights (KBs) under a config claiming
    n_layer=2000, n_embd=16384 (~6.5e12 parameters: building it would take all memory)."""
    c = tiny_model.config
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": tiny_model.state_dict(), "model_args": dict(
        n_layer=2000, n_head=c.n_head, n_embd=16384, block_size=c.block_size, vocab_size=c.vocab_size, bias=True)},
               ckpt)
    from safetensors.torch import save_file

    hf = tmp_path / "hf"
    hf.mkdir()
    state = {k: (v.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v).contiguous()
             for k, v in tiny_model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(dict(
        model_type="gpt2", n_layer=2000, n_head=c.n_head, n_embd=16384, n_positions=c.block_size,
        vocab_size=c.vocab_size, activation_function="gelu")))
    return [ckpt, hf]


def test_config_claiming_a_huge_model_fails_before_building_it(tmp_path, tiny_model):
    """A 574 KB ckpt.pt whose model_args claimed n_layer=2000, n_embd=16384 took 4.1 GB before failing (issue
    #17): the config is checked against the stored tensors before GPT(config) allocates anything."""
    class NotBuilt(GPT):
        def __init__(self, config):
            raise AssertionError(f"GPT({config.n_layer} layers, n_embd {config.n_embd}) constructed before the "
                                 f"checkpoint's shapes were checked")

    for source in _huge_config_checkpoints(tmp_path, tiny_model):
        assert source.stat().st_size < 2_000_000 or source.is_dir()
        with pytest.raises(CheckpointError) as err:
            NotBuilt.from_pretrained(source)
        msg = str(err.value)
        assert source.name in msg and "2000 layers, n_embd 16384" in msg, msg
        assert "missing keys ['transformer.h.10." in msg and "23970 more" in msg, msg
        assert "h.0.attn.c_attn.weight: checkpoint (192, 64), model (49152, 16384)" in msg, msg


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path, tiny_model, value):
    """A NaN weight exported as 'validated' and generated '!!!!!' (issue #17): every loader refuses it."""
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    state["transformer.h.1.mlp.c_fc.weight"][3, 5] = value
    bad = GPT(tiny_model.config)
    bad.load_state_dict(state)
    sources = []
    c = tiny_model.config
    torch.save({"model": state, "model_args": dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                                                   block_size=c.block_size, vocab_size=c.vocab_size)},
               tmp_path / "ckpt.pt")
    sources.append(tmp_path / "ckpt.pt")
    sources.append(save_model(bad, tmp_path / "native"))  # config.json + model.safetensors
    hf = _hf_gpt2(tmp_path / "hf", n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=512)
    with torch.no_grad():
        hf.transformer.h[1].mlp.c_fc.weight[5, 3] = value  # Conv1D (in, out): our (3, 5)
    hf.save_pretrained(tmp_path / "hf")
    sources.append(tmp_path / "hf")
    kind = "1 NaN, 0 inf" if value != value else "0 NaN, 1 inf"
    for source in sources:
        with pytest.raises(CheckpointError, match=rf"transformer\.h\.1\.mlp\.c_fc\.weight \(256, 64\) holds 1 "
                                                  rf"non-finite values of 16384 \({kind}; first at index \(3, 5\)\)"):
            GPT.from_pretrained(source)
