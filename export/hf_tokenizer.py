"""The GPT-2 tokenizer as Hugging Face files, derived from the verified local rank file: nothing downloaded.

tiktoken's `gpt2.tiktoken` (runtime/tokenizer.py) holds each token's bytes and rank; the rank is GPT-2's
token id. Hugging Face tokenizers (transformers, optimum, onnxruntime-genai's onnxruntime-extensions) want
the same BPE as `vocab.json` (byte-level strings -> ids), `merges.txt` (the 50,000 merges in rank order),
`tokenizer.json` (both, plus GPT-2's byte-level pre-tokenizer) and `tokenizer_config.json`. Each merge is
recovered by replaying BPE on the token's bytes with the ranks below its own: the last two parts left are
the pair that makes it. tests/test_export_ecosystem.py checks the result against tiktoken on many texts.

    files = gpt2_tokenizer_files()            # {"vocab.json": bytes, "merges.txt": bytes, ...}
    python -m export.hf_tokenizer out/peers/hf   # writes them into a folder (the GGUF and CTranslate2
                                                 # converters of scripts/compare_peers.py read them there)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from runtime.tokenizer import ENDOFTEXT, EOT_TOKEN, find_ranks, load_tokenizer

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the rest to 256+."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merge_of(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The pair whose merge makes `token`: BPE on its bytes using only merges ranked below it."""
    limit, parts = ranks[token], [bytes([b]) for b in token]
    while len(parts) > 2:
        best, at = limit, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) is not one merge of two lower-ranked tokens")
    return parts[0], parts[1]


def gpt2_tokenizer_files(ranks_path: str | os.PathLike | None = None, model_max_length: int = 1024) -> dict[str, bytes]:
    """{file name: contents} of GPT-2's Hugging Face tokenizer files, from the sha256-verified rank file.

    Args:
        ranks_path: gpt2.tiktoken; default the lookup of runtime/tokenizer.find_ranks (TokenizerError if absent).
        model_max_length: the model's context (block_size), recorded in tokenizer_config.json.
    """
    from tiktoken.load import load_tiktoken_bpe

    path = find_ranks(ranks_path)
    load_tokenizer(path=path)  # verifies the sha256, with the project's error message
    ranks = load_tiktoken_bpe(str(path))
    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {text(tok): rank for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    if len(vocab) != EOT_TOKEN:
        raise ValueError(f"{len(vocab)} distinct byte-level tokens from {len(ranks)} ranks, expected {EOT_TOKEN}")
    vocab[ENDOFTEXT] = EOT_TOKEN
    merges = [" ".join(map(text, _merge_of(ranks, tok))) for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1])
              if len(tok) > 1]
    special = {"content": ENDOFTEXT, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
               "special": True}
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": EOT_TOKEN, **special}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    # pad = eos and left padding: a padded batch from the tokenizer is what a decoder-only generate() expects;
    # no clean-up of spaces, so decode(encode(s)) == s as with tiktoken
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
              "add_bos_token": False, "clean_up_tokenization_spaces": False, "errors": "replace",
              "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
              "padding_side": "left", "added_tokens_decoder": {str(EOT_TOKEN): special}}
    specials = {k: ENDOFTEXT for k in ("bos_token", "eos_token", "unk_token", "pad_token")}

    def dump(obj, indent=None) -> bytes:
        return (json.dumps(obj, ensure_ascii=False, indent=indent) + "\n").encode()

    return {"vocab.json": dump(vocab), "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode(),
            "tokenizer.json": dump(tokenizer), "tokenizer_config.json": dump(config, 2),
            "special_tokens_map.json": dump(specials, 2)}


def write_gpt2_tokenizer_files(folder: str | os.PathLike, ranks_path: str | os.PathLike | None = None) -> list[Path]:
    """Writes TOKENIZER_FILES into `folder` (made if missing; files there are replaced, each atomically: an
    interrupted run leaves no truncated file for a converter to read); returns their paths."""
    from runtime.files import atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, data in gpt2_tokenizer_files(ranks_path).items():
        atomic_write_bytes(folder / name, data)
        out.append(folder / name)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write GPT-2's Hugging Face tokenizer files (from gpt2.tiktoken) into a "
                                            "folder.")
    p.add_argument("folder", help="where to write vocab.json, merges.txt, tokenizer.json, ... (made if missing)")
    p.add_argument("--ranks", help="gpt2.tiktoken (default: the lookup of runtime/tokenizer.find_ranks)")
    args = p.parse_args(argv)
    paths = write_gpt2_tokenizer_files(args.folder, args.ranks)
    print(f"wrote {len(paths)} tokenizer files to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
