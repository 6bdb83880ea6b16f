"""`nanogpt-deploy demo`: the main job end to end: checkpoint -> ONNX export -> parity -> text on onnxruntime.

The default checkpoint is the small GPT embedded in the package (model/weights/pycode, trained on Python
sources with the GPT-2 tokenizer). Everything runs offline: the checkpoint ships with the code, the
tokenizer ranks come from the cache that `scripts/setup.sh` filled. Export and parity need torch;
generation then runs on onnxruntime alone.

    nanogpt-deploy demo
    nanogpt-deploy demo --checkpoint ~/nanoGPT/out/ckpt.pt --prompt "Once upon a time" --out out/mine
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "model" / "weights" / "pycode"
DEFAULT_PROMPTS = {"pycode": "def fibonacci(n):\n", "random": "Hello, my dog is cute"}
# stand-in when the embedded checkpoint is absent: random weights, but GPT-2's vocabulary so text tokenizes
FALLBACK_CONFIG = dict(n_layer=2, n_head=4, n_embd=128, vocab_size=50257, block_size=256)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help=f"checkpoint source (default: the embedded {DEFAULT_CHECKPOINT.name})")
    p.add_argument("--out", default="out/demo", help="where the export goes (default: out/demo)")
    p.add_argument("--prompt", default=None, help="prompt text (default: one suited to the checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default: 64")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="0 = off (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="default: 0 (the demo's text is reproducible)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")


def load_demo_model(checkpoint: str | None):
    """(model, source, kind): the given checkpoint, the embedded one, or a loudly announced random stand-in."""
    from model import GPT, GPTConfig

    if checkpoint:
        return GPT.from_pretrained(checkpoint), checkpoint, "given"
    if (DEFAULT_CHECKPOINT / "config.json").is_file():
        return GPT.from_pretrained(str(DEFAULT_CHECKPOINT)), str(DEFAULT_CHECKPOINT), "pycode"
    print(f"NOTE: the embedded checkpoint {DEFAULT_CHECKPOINT} is missing (train it with scripts/train_tiny.py).\n"
          f"NOTE: using a RANDOM untrained model instead ({FALLBACK_CONFIG}): the pipeline runs, the text is noise.",
          file=sys.stderr)
    return GPT(GPTConfig(**FALLBACK_CONFIG)).init_weights(0), "random init (demo stand-in, seed 0; not reloadable)", "random"


def run(args) -> int:
    import dataclasses
    import inspect

    from export.onnx import export_onnx

    from .artifact import read_onnx_artifact
    from .backends.onnxruntime import OnnxRuntimeBackend
    from .generate import Generation, SamplingParams, summary_line
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer()  # before any work: fails fast, with the fix, when the ranks are missing
    t0 = time.perf_counter()
    model, source, kind = load_demo_model(args.checkpoint)
    c = model.config
    print(f"[1/4] loaded {source}: {c.n_layer} layers, n_embd {c.n_embd}, vocab {c.vocab_size}, "
          f"{model.num_params() / 1e6:.1f}M parameters ({time.perf_counter() - t0:.1f} s)")

    t = time.perf_counter()
    accepted = inspect.signature(export_onnx).parameters
    options = {k: v for k, v in dict(source=source, progress=lambda m: print(f"      {m}")).items() if k in accepted}
    path = export_onnx(model, args.out, **options)
    size = sum(f.stat().st_size for f in Path(path).parent.glob("model.onnx*"))
    print(f"[2/4] exported {path} ({size / 1e6:.1f} MB, {time.perf_counter() - t:.1f} s)")

    backend = OnnxRuntimeBackend(path, provider="cpu", threads=args.threads)
    parity = read_onnx_artifact(path).extra.get("parity")
    if parity:  # measured by the exporter over several (batch, sequence, past) shapes
        print(f"[3/4] parity onnxruntime vs torch: max|Δ| {parity['max_abs_diff']:.2e} over "
              f"{len(parity['shapes'])} (batch, sequence, past) shapes (tolerance {parity['atol']:.0e})")
    else:
        d = check_parity(model, backend)
        print(f"[3/4] parity onnxruntime vs torch: max|Δ| logits {d:.2e} (prefill 2x16, then 1 decode step)")

    prompt = args.prompt or DEFAULT_PROMPTS.get(kind, DEFAULT_PROMPTS["random"])
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            seed=args.seed)
    room = c.block_size - len(tokenizer.encode(prompt))
    if 0 < room < params.max_new_tokens:  # the demo shortens; `generate` refuses (the documented policy)
        params = dataclasses.replace(params, max_new_tokens=room)
    print(f"[4/4] generating on onnxruntime ({backend.provider}, {backend.precision}), seed {args.seed}:\n")
    print(prompt, end="", flush=True)
    gen = Generation(backend, tokenizer, [prompt], params)
    for delta in gen:
        print(delta.text, end="", flush=True)
    print("\n")
    print(summary_line(gen.completions, backend))
    print(f"demo done in {time.perf_counter() - t0:.1f} s; generate again with: "
          f"nanogpt-deploy generate {Path(path).parent} --prompt \"...\"", file=sys.stderr)
    return 0


def check_parity(model, backend) -> float:
    """max|Δ| of logits, torch vs `backend`, over a (2, 16) prefill with left padding and one decode step."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.real_vocab_size, (2, 17))
    mask = np.ones((2, 17), dtype=np.int64)
    mask[1, :3] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    backend.reset(2)
    got = [backend.forward(ids[:, :16], mask[:, :16], pos[:, :16]), backend.forward(ids[:, 16:], mask, pos[:, 16:])]
    with torch.no_grad():
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        want0, past = model(t(ids[:, :16]), t(mask[:, :16]), t(pos[:, :16]))
        want1, _ = model(t(ids[:, 16:]), t(mask), t(pos[:, 16:]), past)
    return max(float(np.max(np.abs(g - w.numpy()))) for g, w in zip(got, (want0, want1)))
