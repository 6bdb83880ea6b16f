"""`nanogpt-deploy generate MODEL --prompt TEXT`: text from an exported model (or, torch backend, a checkpoint).

    nanogpt-deploy generate out/tiny --prompt-ids 1,2,3 --temperature 0 --json
    nanogpt-deploy generate out/demo --prompt "def fib(n):" --max-new-tokens 128 --stop "\\n\\n"
    nanogpt-deploy generate random:tiny@0 --backend torch --prompt-ids 1,2,3
    nanogpt-deploy generate out/gpt2-last5 --draft out/gpt2-int8 --prompt "..."   # speculative: the target's
                                                        # output, decoded faster (runtime/generation/speculative.py)

Text goes to stdout (streamed by default on a terminal); the summary line goes to stderr, so
`> out.txt` keeps only the text and `--json` keeps stdout one JSON document.
"""
from __future__ import annotations

import argparse
import json
import sys

from .args import add_model_flags, add_run_flags, add_sampling_flags, add_tokenizer_flag, finite_float, int_in


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", metavar="IDS",
                     help="prompt as comma-separated token ids, e.g. 1,2,3 (repeat for a batch)")
    add_run_flags(p, tf32=True)
    add_sampling_flags(p)
    p.add_argument("--top-p", type=finite_float, default=1.0, help="nucleus mass in (0, 1]; 1 = off")
    p.add_argument("--repetition-penalty", type=finite_float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int_in(0, None, "a seed"),
                   default=None, help="same seed, same backend -> same tokens")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); trimmed from the text")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at <|endoftext|>")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print text as it is produced (default: on when stdout is a terminal)")
    p.add_argument("--draft", default=None, metavar="DIR",
                   help="speculative decoding: a cheaper export of the same checkpoint (e.g. its --quantize int8 / "
                        "int4 folder) guesses tokens and MODEL checks them in one step; the output is MODEL's own. "
                        "MODEL must keep --speculate + 1 logits positions (export --logits last:5 or all); "
                        "several prompts need "
                        "a --kv-cache concat pair")
    p.add_argument("--speculate", type=int_in(1, 64, "a guess count"), default=None, metavar="K",
                   help="most tokens the draft guesses per round (default: 4); each round guesses 0..K, whichever the "
                        "measured acceptance and step costs make fastest (0: a plain decode step)")
    p.add_argument("--json", action="store_true", help="print one JSON document: tokens, text, timing")
    add_tokenizer_flag(p)


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r} is not a comma-separated list of integers (e.g. 1,2,3)") from None


def prompt_heading(prompt: str | list[int], width: int = 40) -> str:
    """A batch row's heading: its prompt, shortened to `width` characters (`--- 'def fib(n):' ---`)."""
    text = repr(prompt) if isinstance(prompt, str) else ",".join(map(str, prompt))
    return f"--- {text if len(text) <= width else text[:width - 3] + '...'} ---"


def run(args) -> int:
    import secrets
    import time

    from ..generation import SamplingParams, make_generation, summary_line
    from ..loading import load_pair
    from ..tokenizer import load_tokenizer

    # sampling without --seed draws one here, so that --json (and the summary) can say how to repeat the run;
    # greedy draws nothing and records null
    seed = args.seed if args.seed is not None or args.temperature == 0 else secrets.randbelow(2**32)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=seed, stop=tuple(args.stop),
        stop_token_ids=() if args.ignore_eos else SamplingParams.stop_token_ids)
    prompts = args.prompt if args.prompt is not None else [parse_ids(s) for s in args.prompt_ids]
    tokenizer = load_tokenizer(path=args.tokenizer_file)
    if args.backend == "tensorrt":  # always CUDA; its engine fixes the rest
        if args.provider == "cpu":
            raise ValueError("the tensorrt backend runs on CUDA only; drop --provider cpu or use --backend onnxruntime")
        options = {}
    else:
        options = dict(provider=args.provider or "cpu", threads=args.threads)
    options.update(verify_weights=not args.no_verify_weights, decode=args.decode, tf32=args.tf32)
    backend, draft = load_pair(args.backend, args.model, args.draft, args.speculate, **options)
    gen = make_generation(backend, tokenizer, prompts, params, draft, args.speculate)

    streaming = (sys.stdout.isatty() if args.stream is None else args.stream) and not args.json
    t0 = time.perf_counter()
    for delta in gen:
        if streaming and len(prompts) == 1 and delta.text:
            print(delta.text, end="", flush=True)
    seconds = time.perf_counter() - t0
    completions = gen.completions
    if args.json:
        doc = {"backend": backend.name, "provider": backend.provider, "precision": backend.precision,
               "seed": seed, "seconds": seconds, "completions": [c.to_dict() for c in completions]}
        if hasattr(backend, "graph_stats"):  # how decode steps ran: CUDA graphs, static shapes, fallbacks
            doc["decode"] = backend.graph_stats()
        if getattr(gen, "stats", None):
            doc["speculative"] = dict(gen.stats, draft=args.draft, draft_precision=draft.precision)
        json.dump(doc, sys.stdout, indent=1)
        print()
    elif streaming and len(prompts) == 1:
        print()
    else:
        for prompt, c in zip(prompts, completions):
            if len(completions) > 1:
                print(prompt_heading(prompt))
            print(c.text)
    if not args.json:  # the summary (stderr) on a line of its own, after all of the text, whatever the buffering
        sys.stdout.flush()
        print(file=sys.stderr)
    line = summary_line(completions, backend, seconds)
    if seed is not None and args.seed is None:
        line += f"; seed {seed} (drawn; --seed {seed} repeats this run)"
    stats = getattr(gen, "stats", None)
    if stats:
        line += (f"; speculative with {args.draft}: {stats['accepted']}/{stats['drafted']} guesses accepted "
                 f"({stats['acceptance']:.0%}), {stats['tokens_per_target_step']:.2f} tokens per target step")
    print(line, file=sys.stderr)
    return 0
