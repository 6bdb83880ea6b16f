"""The files other tools need beside model.onnx to run an export as it is: nothing converted, nothing downloaded.

- `config.json` + `generation_config.json`: Hugging Face optimum's `ORTModelForCausalLM.from_pretrained(DIR)`
  (and transformers) read the model type and shape there; the graph already has their I/O names.
- `genai_config.json`: onnxruntime-genai's `og.Model(DIR)`, a "decoder" with the `past_key_values.%d.*` /
  `present.%d.*` names; `past_present_share_buffer` follows the cache layout (concat: a new present each
  step; shared: GroupQueryAttention writes in place into one buffer of `max_length` slots).
- the GPT-2 tokenizer files (export/hf_tokenizer.py), derived from the verified local `gpt2.tiktoken`.

A `kv_cache="shared"` export gets no `config.json`: GroupQueryAttention reads each row's length from the mask
as if the row were padded on the right, and optimum pads on the left, so a padded batch there would give
wrong tokens without an error. Without the file optimum refuses to load the folder. onnxruntime-genai pads on
the right, so the shared export runs right there and keeps its genai_config.json.

    write_tool_files(Path("out/tiny"), read_onnx_artifact("out/tiny"))   # export_onnx does this
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from runtime.artifact import Artifact

from .hf_tokenizer import TOKENIZER_FILES, gpt2_tokenizer_files

HF_FILES = ("config.json", "generation_config.json")
GENAI_FILES = ("genai_config.json",)
TOOL_FILES = HF_FILES + GENAI_FILES + TOKENIZER_FILES  # every file an export may write beside model.onnx
EOT = 50256  # GPT-2's <|endoftext|>: bos, eos and pad


def hf_config(art: Artifact) -> dict:
    """transformers' GPT2Config of the export (what optimum reads: model type, layers, heads, vocab)."""
    c = art.config
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd,
        "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
        "activation_function": "gelu_new" if c.gelu == "tanh" else "gelu",  # GPT-2's tanh GELU / nanoGPT's exact one
        "layer_norm_epsilon": c.layer_norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "initializer_range": 0.02, "bos_token_id": EOT, "eos_token_id": EOT, "use_cache": True,
        "tie_word_embeddings": True, "torch_dtype": "float16" if art.precision == "fp16" else "float32",
    }


def generation_config() -> dict:
    return {"bos_token_id": EOT, "eos_token_id": EOT, "pad_token_id": EOT}


def genai_config(art: Artifact) -> dict:
    """onnxruntime-genai's config: a generic "decoder" ("gpt2" there means the old combined-past format)."""
    c = art.config
    return {
        "model": {
            "type": "decoder", "vocab_size": c.vocab_size, "context_length": c.block_size,
            "bos_token_id": EOT, "eos_token_id": EOT, "pad_token_id": EOT,
            "decoder": {
                "filename": "model.onnx", "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": c.head_dim, "hidden_size": c.n_embd, "num_attention_heads": c.n_head,
                "num_key_value_heads": c.n_head, "num_hidden_layers": c.n_layer,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": c.block_size,
                   "min_length": 0, "top_k": 1, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0,
                   "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0, "early_stopping": True,
                   "past_present_share_buffer": art.kv_cache == "shared"},
    }


def tool_files(art: Artifact, ranks_path: str | os.PathLike | None = None, tokenizer: bool = True) -> dict[str, bytes]:
    """{file name: contents} for `art`'s folder (see the module docstring for which and why)."""
    def dump(obj) -> bytes:
        return (json.dumps(obj, indent=2) + "\n").encode()

    out = {} if art.kv_cache == "shared" else {"config.json": dump(hf_config(art)),
                                               "generation_config.json": dump(generation_config())}
    out["genai_config.json"] = dump(genai_config(art))
    if tokenizer and art.tokenizer == "gpt2":
        out.update(gpt2_tokenizer_files(ranks_path, model_max_length=art.config.block_size))
    return out


def write_tool_files(folder: Path, art: Artifact, ranks_path: str | os.PathLike | None = None,
                     progress=lambda msg: None) -> list[str]:
    """Write tool_files(art) into `folder` (an export's temporary folder, before publish); returns the names.

    Without the GPT-2 rank file (runtime/tokenizer.py) the tokenizer files are left out, with a line to
    `progress` saying how to get them; the rest is written.
    """
    from runtime.tokenizer import TokenizerError

    try:
        files = tool_files(art, ranks_path)
    except TokenizerError as e:
        progress(f"tokenizer files left out (other tools then need their own): {e}")
        files = tool_files(art, tokenizer=False)
    for name, data in files.items():
        (Path(folder) / name).write_bytes(data)
    return sorted(files)
