"""Speculative decoding on one target + draft pair: speed against plain decoding, acceptance, identical output.

For each sampling setting, every prompt runs three ways on the same loaded sessions: the target alone,
speculative with adaptive depth (the default), and speculative guessing --speculate tokens every round.
Reported per way: end-to-end tok/s (medians over prompts), guesses accepted, decode tokens per target
step, and whether the tokens equal the target's own (they must: the target's sampler picks every token).

    # the trained model: realistic acceptance (text prompts from runtime/tools/verify.py)
    python scripts/speculative_check.py out/pycode-shared/fp32 out/pycode-shared/int8 --text
    # the 124M shape (random weights; prompts are seeded random ids), greedy and sampled
    python scripts/speculative_check.py out/peers/onnx23-fp32-last5-shared out/peers/onnx23-int8-last-shared \\
        --temperature 0 --temperature 0.8 --prompts 2
    # onnxruntime's default thread spinning, to see what force_spinning_stop is worth
    python scripts/speculative_check.py ... --spin
    # batches of 8 prompts (a concat-cache pair: the rows' unequal acceptance leaves holes in the caches)
    python scripts/speculative_check.py out/peers/onnx23-fp32-last5 out/peers/onnx23-int8-last --batch 8 --prompts 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("target", help="exported folder keeping speculate + 1 logits positions (--logits last:5 or all)")
    p.add_argument("draft", help="exported folder of the draft (e.g. the int8 export of the same checkpoint)")
    p.add_argument("--speculate", type=int, default=4)
    p.add_argument("--temperature", type=float, action="append", default=None,
                   help="repeatable; 0 = greedy (default: 0 and 0.8, top-k 200)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--text", action="store_true",
                   help="the fixed text prompts of nanogpt-deploy verify (a trained model)")
    p.add_argument("--prompts", type=int, default=3, help="random 32-token prompts without --text (default 3); with "
                                                          "--batch, batches of them")
    p.add_argument("--batch", type=int, default=1, help="prompts per generate call (default 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--spin", action="store_true", help="keep onnxruntime's thread spinning between runs (default: off)")
    args = p.parse_args(argv)

    import numpy as np

    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.generation import SamplingParams, SpeculativeGeneration, make_generation
    from runtime.tokenizer import load_tokenizer
    from runtime.tools.verify import PROMPTS

    target = OnnxRuntimeBackend(args.target, threads=args.threads, spinning=args.spin)
    draft = OnnxRuntimeBackend(args.draft, threads=args.threads, spinning=args.spin)
    tok = load_tokenizer() if args.text else None
    V = target.config.real_vocab_size
    flat = list(PROMPTS) if args.text else \
        np.random.default_rng(0).integers(0, V, (args.prompts * args.batch, 32)).tolist()
    prompts = [flat[i:i + args.batch] for i in range(0, len(flat), args.batch)]  # one generate call each
    print(f"target {args.target} ({target.precision}), draft {args.draft} ({draft.precision}), "
          f"{len(prompts)} x {args.batch} prompts x {args.new_tokens} tokens, {args.threads} threads, "
          f"spinning {'on' if args.spin else 'off'}")
    for temp in args.temperature or [0.0, 0.8]:
        sp = SamplingParams(temperature=temp, top_k=0 if temp == 0 else 200, seed=0, max_new_tokens=args.new_tokens,
                            stop_token_ids=())
        ways = {"plain": None, "adaptive": True, f"fixed K={args.speculate}": False}
        rates = {w: [] for w in ways}
        stats = {w: [0, 0, 0, 0.0] for w in ways}  # accepted, drafted, decode tokens, target steps x rows
        same = {w: 0 for w in ways}
        for prompt in prompts:
            ref = None
            for way, adaptive in ways.items():
                t0 = time.perf_counter()
                g = make_generation(target, tok, prompt, sp) if adaptive is None else \
                    SpeculativeGeneration(target, tok, prompt, sp, draft, args.speculate, adaptive=adaptive)
                for _ in g:
                    pass
                tokens = [c.token_ids for c in g.completions]
                rates[way].append(sum(map(len, tokens)) / (time.perf_counter() - t0))
                ref = tokens if ref is None else ref
                same[way] += tokens == ref
                if adaptive is not None:
                    s, decoded = g.stats, sum(len(t) - 1 for t in tokens)
                    row_steps = decoded / s["tokens_per_target_step"] if s["tokens_per_target_step"] else 0
                    for i, v in enumerate((s["accepted"], s["drafted"], decoded, row_steps)):
                        stats[way][i] += v
        print(f"temperature {temp:g}{'' if temp == 0 else ', top-k 200'}:")
        for way in ways:
            acc, drafted, toks, steps = stats[way]
            extra = "" if way == "plain" else \
                (f", {acc}/{drafted} guesses accepted ({acc / max(drafted, 1):.1%}), "
                 f"{toks / max(steps, 1):.2f} tokens per target step (of a row)")
            print(f"  {way:>10}: {statistics.median(rates[way]):6.1f} tok/s{extra}, "
                  f"tokens = plain for {same[way]}/{len(prompts)} {'batches' if args.batch > 1 else 'prompts'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
