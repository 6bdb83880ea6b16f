"""Load GPT weights from wherever users keep them, with one table of key renames.

Sources `read_checkpoint` reads (and `GPT.from_pretrained`, model/gpt.py, builds a model from):
- a local Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin);
- a folder this project wrote (config.json holding a GPTConfig + model.safetensors);
- a nanoGPT `ckpt.pt` ({'model': state_dict, 'model_args': {...}}, as nanoGPT's train.py saves it);
- a hub name (`gpt2`, `gpt2-medium`, `org/name`, ...) via huggingface_hub, when online;
- `random:PRESET` or `random:PRESET@SEED` for an explicitly requested seeded random model.

Below model/gpt.py: this module reads configs and state dicts and checks them against the shapes a config
implies (`state_shapes`), without the GPT class; the model is built by GPT.from_pretrained.
Nothing here can run code from a checkpoint: pickles load with `torch.load(weights_only=True)`.
Random weights are never substituted for requested pretrained ones.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
from pathlib import Path

import torch

from .config import GPT2_VOCAB_SIZE, PRESETS, GPTConfig

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
# HF GPT-2 stores these as Conv1D, (in, out): transposed relative to nn.Linear
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# buffers some writers save that are not weights (causal-mask caches)
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# HF GPT-2 config options that change what the model computes, with GPT-2's value (the only one this model
# computes) and what another value does. reorder_and_upcast_attn is accepted: it only moves the 1/sqrt(head_dim)
# scaling and upcasts under fp16 autocast; in fp32 transformers' logits are unchanged (bit-equal, 5.23).
HF_FIXED_OPTIONS = {
    "scale_attn_weights": (True, "leaves attention scores unscaled (no 1/sqrt(head_dim))"),
    "scale_attn_by_inverse_layer_idx": (False, "divides layer i's attention scores by i + 1"),
    "add_cross_attention": (False, "adds cross-attention layers over an encoder's output"),
}
# what transformers also accepts for GPT-2's config keys (GPT2Config.attribute_map)
HF_ALIASES = {"n_embd": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
              "n_positions": "max_position_embeddings"}
# GPTConfig fields a nanoGPT model_args must give as integers
INT_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "real_vocab_size")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or does not match the model."""


def read_checkpoint(source: str | os.PathLike, *, gelu: str | None = None) -> tuple[GPTConfig, dict, list[Path]]:
    """(config, state dict checked against it, the files read) of a checkpoint folder, ckpt.pt or hub name.

    gelu overrides the GELU form the reader picks ("tanh" for GPT-2 weights, "exact" for nanoGPT). The state
    is normalized to GPT's keys and checked (shapes from the config alone, values finite) before anything the
    size of the model is allocated.
    """
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.is_dir():
        config, state, files = _read_folder(path)
    elif path.is_file():
        config, state, files = _read_nanogpt_ckpt(path)
    elif path.exists():
        raise CheckpointError(f"{path} is neither a file nor a folder")
    elif not is_hub_name(source):
        raise CheckpointError(
            f"checkpoint {source!r} does not exist; give a Hugging Face GPT-2 folder, a nanoGPT "
            f"ckpt.pt, a hub name ({', '.join(HUB_NAMES)}) or random:PRESET")
    else:
        config, state, files = _read_folder(_download_from_hub(source))
    if gelu:
        config = dataclasses.replace(config, gelu=gelu)
    return config, _check_state(config, state, files[0]), files


def is_hub_name(source: str) -> bool:
    """Whether read_checkpoint fetches `source` from the Hugging Face hub (`gpt2`, `org/name`): nothing by that name
    here, and it does not read as a path (`./x`, `x.pt`, `a/b/c`, or `out/typo` where `out` is a local folder)."""
    s = os.fspath(source)
    if s.startswith("random:") or Path(s).expanduser().exists():
        return False
    path_like = s.startswith((".", "/", "~")) or s.endswith((".pt", ".pth", ".bin", ".safetensors")) or s.count("/") > 1
    return not path_like and not ("/" in s and Path(s.split("/")[0]).is_dir())


def random_spec(spec: str) -> tuple[GPTConfig, int]:
    """`PRESET[@SEED]` (of `random:PRESET[@SEED]`) -> (the preset's config, the seed)."""
    name, _, seed = spec.partition("@")
    if name not in PRESETS:
        raise CheckpointError(f"unknown preset {name!r} in random:{spec}; choose one of {sorted(PRESETS)}")
    try:
        seed_value = int(seed or 0)
    except ValueError:
        raise CheckpointError(f"random:{spec}: seed {seed!r} is not an integer (e.g. random:{name}@0)") from None
    return PRESETS[name], seed_value


# ---------------------------------------------------------------------------------- file readers

def _read_folder(path: Path) -> tuple[GPTConfig, dict, list[Path]]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json; expected a Hugging Face GPT-2 folder or one written by this project")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    config = _config_from_hf(raw, cfg_path) if "model_type" in raw else _config_native(raw, cfg_path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        weights = path / name
        if weights.is_file():
            state = _read_safetensors(weights) if name.endswith(".safetensors") else _torch_load(weights)
            if "model_type" in raw:  # HF Conv1D stores (in, out); nn.Linear wants (out, in)
                state = {k: v.t() if k.endswith(CONV1D_SUFFIXES) and v.dim() == 2 else v for k, v in state.items()}
            return config, state, [weights, cfg_path]
    if any(path.glob("*.index.json")):
        raise CheckpointError(f"{path} holds a sharded checkpoint; sharded weights are not supported yet, merge them first")
    raise CheckpointError(f"{path} has config.json but no model.safetensors or pytorch_model.bin")


def _config_from_hf(raw: dict, where: Path) -> GPTConfig:
    if raw.get("model_type") != "gpt2":
        raise CheckpointError(f"{where}: model_type {raw.get('model_type')!r} is not supported; only GPT-2 ('gpt2') is")
    raw = {**{key: raw[alias] for key, alias in HF_ALIASES.items() if alias in raw}, **raw}
    act = raw.get("activation_function", "gelu_new")
    gelu = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "exact"}.get(act)
    if gelu is None:
        raise CheckpointError(f"{where}: activation_function {act!r} is not supported (gelu_new or gelu)")
    for key, (default, what) in HF_FIXED_OPTIONS.items():
        if raw.get(key, default) != default:
            raise CheckpointError(f"{where}: {key}={raw[key]!r} is not supported: it {what}, which this model "
                                  f"does not compute (GPT-2's {key}={default!r})")
    n_embd = raw.get("n_embd", 768)
    if raw.get("n_inner") not in (None, 4 * n_embd):
        raise CheckpointError(f"{where}: n_inner={raw['n_inner']} is not supported (must be 4*n_embd={4 * n_embd})")
    vocab = raw.get("vocab_size", GPT2_VOCAB_SIZE)
    try:
        return GPTConfig(
            block_size=raw.get("n_positions", raw.get("n_ctx", 1024)), vocab_size=vocab, n_layer=raw.get("n_layer", 12),
            n_head=raw.get("n_head", 12), n_embd=n_embd, bias=True, gelu=gelu,
            layer_norm_eps=raw.get("layer_norm_epsilon", 1e-5), real_vocab_size=_real_vocab(vocab))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: does not describe a GPT-2: {e}") from None


def _config_native(raw: dict, where: Path) -> GPTConfig:
    try:
        return GPTConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: not a Hugging Face GPT-2 config (no model_type) nor a GPTConfig: {e}") from None


def _real_vocab(vocab_size: int) -> int:
    # nanoGPT pads 50257 to 50304 for speed; the rows past the tokenizer's are never sampled
    return GPT2_VOCAB_SIZE if vocab_size > GPT2_VOCAB_SIZE else vocab_size


def _read_nanogpt_ckpt(path: Path) -> tuple[GPTConfig, dict, list[Path]]:
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: a bare .safetensors has no config; put it in a folder with its config.json")
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        keys = sorted(ckpt, key=str)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a nanoGPT checkpoint: expected keys 'model' and 'model_args', found {keys}")
    if not isinstance(ckpt["model_args"], dict):
        raise CheckpointError(f"{path}: model_args is {type(ckpt['model_args']).__name__}, not a dict of GPT settings "
                              f"(n_layer, n_head, n_embd, block_size, vocab_size, ...) as nanoGPT's train.py saves")
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: 'model' is {type(ckpt['model']).__name__}, not a state dict (name -> tensor)")
    args = dict(ckpt["model_args"])
    known = {f.name for f in dataclasses.fields(GPTConfig)} - {"dropout"}
    not_int = {k: args[k] for k in INT_FIELDS if k in args and type(args[k]) is not int and args[k] is not None}
    if not_int:
        raise CheckpointError(f"{path}: model_args {not_int} must be integers")
    # nanoGPT's model_args have neither gelu nor real_vocab_size: its MLP is nn.GELU() (exact), its vocab may be padded
    args.setdefault("gelu", "exact")
    vocab = args.get("vocab_size", GPT2_VOCAB_SIZE)
    args["real_vocab_size"] = args.get("real_vocab_size") or (_real_vocab(vocab) if type(vocab) is int else None)
    try:
        config = GPTConfig(**{k: v for k, v in args.items() if k in known})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model_args {args} do not describe a GPT: {e}") from None
    return config, ckpt["model"], [path]


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure here means "not a safe, readable checkpoint"
        # torch wraps the weights_only unpickler's error in a long generic one; the original is its context
        inner = e.__context__ if isinstance(e, pickle.UnpicklingError) and e.__context__ is not None else e
        msg = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
        # the unpickler read a well-formed pickle and refused what it builds (a global such as os.system, an
        # object); "Unsupported operand" / "String is too long" mean bytes it cannot parse: not a checkpoint
        if isinstance(e, pickle.UnpicklingError) and not msg.startswith(("Unsupported operand", "String is too long")):
            raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain containers, "
                                  f"which could run code on load (torch.load weights_only=True: {msg})") from None
        hint = (" (model.onnx is an export, not a SOURCE: give the checkpoint it was exported from)"
                if path.suffix == ".onnx" else "")
        raise CheckpointError(f"{path} is not a torch checkpoint (ckpt.pt saved by torch.save), or it is truncated: "
                              f"torch.load could not read it ({msg}){hint}") from None


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated?): {e}") from None


def _download_from_hub(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{name!r} is not a local path; to fetch it from the Hugging Face hub install "
                              f"the extra: pip install 'nanogpt-deploy[hub]'") from None
    patterns = ["config.json", "model.safetensors", "pytorch_model.bin"]
    try:  # the local hub cache first: works offline once downloaded
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001
        pass
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"could not get {name!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"offline machines need a local folder or ckpt.pt; use random:{name if name in PRESETS else 'gpt2'} "
            f"only if you want random weights") from None


# ---------------------------------------------------------------------------------- state dicts

def _normalize_keys(state: dict, where: Path) -> dict:
    out = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = key.removeprefix("_orig_mod.")  # torch.compile
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # GPT2Model (no LM head) saves without the prefix
        if key.endswith(IGNORED_SUFFIXES):
            continue
        out[key] = tensor
    wte, head = out.get("transformer.wte.weight"), out.get("lm_head.weight")
    if wte is not None and head is not None and not torch.equal(wte, head):
        raise CheckpointError(f"{where}: the checkpoint has an untied lm_head (lm_head.weight differs from "
                              f"transformer.wte.weight), which this model (tied wte/lm_head, as GPT-2) cannot represent")
    if "lm_head.weight" not in out and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]  # tied; safetensors stores it once
    out.pop("transformer.wte.weight", None)  # same storage as lm_head in our module
    return out


def state_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """{state_dict key: shape} of GPT(config), without building it (nothing allocated): a checkpoint is
    checked against this before the model is constructed. Tied lm_head listed once, as lm_head.weight."""
    C, V = config.n_embd, config.vocab_size
    shapes = {"transformer.wpe.weight": (config.block_size, C)}
    layer = {"ln_1.weight": (C,), "attn.c_attn.weight": (3 * C, C), "attn.c_proj.weight": (C, C),
             "ln_2.weight": (C,), "mlp.c_fc.weight": (4 * C, C), "mlp.c_proj.weight": (C, 4 * C)}
    if config.bias:
        layer.update({"ln_1.bias": (C,), "attn.c_attn.bias": (3 * C,), "attn.c_proj.bias": (C,),
                      "ln_2.bias": (C,), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.bias": (C,)})
    for i in range(config.n_layer):
        shapes.update({f"transformer.h.{i}.{k}": s for k, s in layer.items()})
    shapes["transformer.ln_f.weight"] = (C,)
    if config.bias:
        shapes["transformer.ln_f.bias"] = (C,)
    shapes["lm_head.weight"] = (V, C)
    return shapes


def _check_state(config: GPTConfig, state: dict, where: Path) -> dict:
    """The normalized state if it holds exactly GPT(config)'s tensors, with their shapes, all finite; else a
    CheckpointError naming the differences. Reads shapes from the config alone: nothing is allocated."""
    state = _normalize_keys(state, where)
    expected = state_shapes(config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = []
    for key in sorted(set(expected) & set(state)):
        want, got = expected[key], tuple(state[key].shape)
        if got != want:
            wrong.append(f"{key}: checkpoint {got}, model {want}")
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:6]) + (f" ... {len(wrong) - 6} more" if len(wrong) > 6 else ""))
    if problems:
        want_n = sum(math.prod(s) for s in expected.values())
        got_n = sum(t.numel() for t in state.values())
        raise CheckpointError(
            f"{where} does not match the model its config describes ({config.n_layer} layers, n_embd "
            f"{config.n_embd}, vocab {config.vocab_size}: {want_n:.3g} parameters, {want_n * 4 / 1e9:,.1f} GB in fp32; "
            f"the checkpoint holds {got_n:.3g}): " + "; ".join(problems)
            + "; fix the config (model_args / config.json) or give the checkpoint it belongs to")
    check_finite(state, where)
    return state


def check_finite(state: dict, where) -> None:
    """Raise CheckpointError naming the first tensor of `state` holding a NaN or inf."""
    # a NaN weight exports and "validates" (NaN compares false) and generates token 0 forever: refuse it here
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = ~torch.isfinite(tensor)
            first = tuple(int(i) for i in bad.nonzero()[0])
            n_nan = int(torch.isnan(tensor).sum())
            raise CheckpointError(
                f"{where}: tensor {key} {tuple(tensor.shape)} holds {int(bad.sum())} non-finite values of "
                f"{tensor.numel()} ({n_nan} NaN, {int(bad.sum()) - n_nan} inf; first at index {first}); the "
                f"checkpoint is corrupt or its training diverged: load an earlier checkpoint")


def load_state(model: torch.nn.Module, state: dict) -> None:
    """Copy a state read_checkpoint returned (checked against state_shapes) into `model`, a GPT."""
    expected = {k: v for k, v in model.state_dict().items() if k != "transformer.wte.weight"}
    assert set(expected) == set(state), "state not checked against state_shapes"
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor.to(expected[key].dtype))


def _short(keys: list[str]) -> str:
    return str(keys[:6])[:-1] + (f", ... {len(keys) - 6} more]" if len(keys) > 6 else "]")


def save_model(model: torch.nn.Module, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write `model` (a GPT) as a folder this project (GPT.from_pretrained) reads: config.json + model.safetensors."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if k != "transformer.wte.weight"}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    tmp_cfg = out / "config.json.tmp"
    tmp_cfg.write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp_cfg, out / "config.json")
    return out
