"""`nanogpt-deploy fetch-tokenizer`: fetch the GPT-2 tokenizer ranks and check their sha256 (needs the package
registry, or a local openai-whisper sdist with --sdist).

    nanogpt-deploy fetch-tokenizer
    nanogpt-deploy fetch-tokenizer --sdist openai-whisper-20250625.tar.gz --out gpt2.tiktoken
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="where to write gpt2.tiktoken (default: the cache)")
    p.add_argument("--sdist", default=None, help="a local openai-whisper sdist to take it from (offline)")


def run(args) -> int:
    from ..tokenizer import fetch_ranks

    fetch_ranks(args.out, args.sdist, progress=lambda msg: print(msg, flush=True))
    return 0
