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

from runtime.cli.args import add_sampling_flags, int_in

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "model" / "weights" / "pycode"
DEFAULT_PROMPTS = {"pycode": "def fibonacci(n):\n", "random": "Hello, my dog is cute"}
# stand-in when the embedded checkpoint is absent: random weights, but GPT-2's vocabulary so text tokenizes
FALLBACK_CONFIG = dict(n_layer=2, n_head=4, n_embd=128, vocab_size=50257, block_size=256)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint",
                   default=None, help=f"checkpoint source (default: the embedded {DEFAULT_CHECKPOINT.name})")
    p.add_argument("--out", default="out/demo", help="where the export goes")
    p.add_argument("--prompt", default=None, help="prompt text (default: one suited to the checkpoint)")
    add_sampling_flags(p)
    p.add_argument("--seed", type=int_in(0, None, "a seed"), default=0, help="the demo's text is reproducible")
    p.add_argument("--threads", type=int_in(1, 1024, "a thread count"),
                   default=None, help="onnxruntime intra-op threads")


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
    source = "random init (demo stand-in, seed 0; not reloadable)"
    return GPT(GPTConfig(**FALLBACK_CONFIG)).init_weights(0), source, "random"


def run(args) -> int:
    import dataclasses

    from runtime.artifact import read_onnx_artifact
    from runtime.backends import load_backend
    from runtime.generation import Generation, SamplingParams, summary_line
    from runtime.tokenizer import load_tokenizer

    from .onnx import export_onnx

    tokenizer = load_tokenizer()  # before any work: fails fast, with the fix, when the ranks are missing
    t0 = time.perf_counter()
    model, source, kind = load_demo_model(args.checkpoint)
    c = model.config
    # the prompt and sampling settings are checked here, before the export's seconds are spent
    prompt = args.prompt or DEFAULT_PROMPTS.get(kind, DEFAULT_PROMPTS["random"])
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            seed=args.seed)
    room = c.block_size - len(tokenizer.encode(prompt))
    if room < 1:
        raise ValueError(f"--prompt is {c.block_size - room} tokens, which leaves no room to generate within this "
                         f"checkpoint's block_size {c.block_size}; give a shorter --prompt")
    if room < params.max_new_tokens:  # the demo shortens; `generate` refuses (the documented policy)
        params = dataclasses.replace(params, max_new_tokens=room)
    print(f"[1/4] loaded {source}: {c.n_layer} layers, n_embd {c.n_embd}, vocab {c.vocab_size}, "
          f"{model.num_params() / 1e6:.1f}M parameters ({time.perf_counter() - t0:.1f} s)")

    t = time.perf_counter()
    path = export_onnx(model, args.out, source=source, progress=lambda m: print(f"      [{time.perf_counter() - t:4.1f}s] {m}", flush=True))
    size = sum(f.stat().st_size for f in Path(path).parent.glob("model.onnx*"))
    print(f"[2/4] exported {path} ({size / 1e6:.1f} MB, {time.perf_counter() - t:.1f} s)")

    # measured by the exporter right after tracing; the export fails instead of publishing a graph that misses it
    parity = read_onnx_artifact(path).extra["parity"]
    print(f"[3/4] parity onnxruntime vs torch: max|Δ| {parity['max_abs_diff']:.2e} over "
          f"{len(parity['shapes'])} (batch, sequence, past) shapes (tolerance {parity['atol']:.0e})")
    backend = load_backend("onnxruntime", str(path), provider="cpu", threads=args.threads)

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

