"""`nanogpt-deploy verify MODEL...`: every backend and variant against torch fp32 on one checkpoint; exit 1 on a miss.

    nanogpt-deploy verify out/pycode out/pycode-int8 out/pycode-int4
    nanogpt-deploy verify out/ --min-top1 int8=0.97 --max-ppl-change int4=0.05 --json > verify.json
    nanogpt-deploy verify out/pycode --text notes.txt --max-abs-diff fp32=1e-5

Checks (runtime/tools/verify.py): max|Δlogits| per (batch, seq, past) shape, top-1 agreement over a fixed
prompt set and the text, perplexity on the text (default: the checkpoint's held-out files), greedy token
identity over 128 tokens. Thresholds are PRECISION=VALUE flags (repeatable, or comma-separated); a
precision without a threshold is reported, not gated. The table (or --json) goes to stdout, stages
and the verdict to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .args import add_run_flags, add_tokenizer_flag, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..tools.verify import THRESHOLDS

    def shown(check: str) -> str:
        return ",".join(f"{k}={v:g}" for k, v in THRESHOLDS[check].items())

    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="exported folders (or a folder of them), optionally the checkpoint itself")
    p.add_argument("--backends", type=lambda s: [x for x in s.split(",") if x], default=["onnxruntime", "torch"],
                   help="comma-separated; torch is the reference")
    p.add_argument("--providers", type=lambda s: [x for x in s.split(",") if x], default=["cpu"],
                   help="comma-separated: cpu,cuda")
    p.add_argument("--max-abs-diff", action="append", metavar="PREC=X",
                   help=f"max |Δlogits| vs the reference at every shape (default {shown('max_abs_diff')})")
    p.add_argument("--min-top1", action="append", metavar="PREC=X",
                   help=f"min top-1 agreement, 0..1 (default {shown('min_top1')})")
    p.add_argument("--max-ppl-change", action="append", metavar="PREC=X",
                   help=f"max relative perplexity increase (default {shown('max_ppl_change')})")
    p.add_argument("--min-greedy-match", action="append", metavar="PREC=X",
                   help=f"min fraction of greedy tokens identical before the first divergence "
                        f"(default {shown('min_greedy_match')})")
    p.add_argument("--min-batched-alone", action="append", metavar="PREC=X",
                   help=f"min fraction of rows of a greedy batch that get the tokens their prompt gets alone "
                        f"(default {shown('min_batched_alone')}; int8 / int4 reported only)")
    p.add_argument("--text", action="append", metavar="FILE",
                   help="text for perplexity and top-1 (repeatable; default: the checkpoint's held-out files)")
    p.add_argument("--text-tokens", type=positive_int, default=2048, help="evaluation tokens at most")
    p.add_argument("--window", type=positive_int, default=256, help="tokens per evaluation window, <= block_size")
    p.add_argument("--greedy-tokens", type=positive_int, default=128, help="greedy tokens per prompt")
    add_run_flags(p, tf32=True)
    p.add_argument("--json", action="store_true", help="print the report as one JSON document")
    add_tokenizer_flag(p)


def tf32_note(report: dict) -> str:
    """Which GPU targets ran fp32 MatMuls in TF32 (nothing to say when none ran on a GPU)."""
    runs = [report["reference"], *report["targets"]]
    gpu = [t for t in runs if "cuda" in str(t.get("provider", t.get("label", "")))]
    on = [t["label"] for t in runs if t.get("tf32")]
    return f"; TF32 on: {', '.join(on)}" if on else "; TF32 off" if gpu else ""


def run(args) -> int:
    from ..tokenizer import load_tokenizer
    from ..tools.verify import format_report, parse_thresholds, verify

    t0 = time.perf_counter()

    def progress(msg: str) -> None:  # a line per stage with the seconds so far: verify runs for minutes on 124M
        print(f"[{time.perf_counter() - t0:6.1f}s] verifying {msg}", file=sys.stderr, flush=True)

    thresholds = parse_thresholds({"max_abs_diff": args.max_abs_diff, "min_top1": args.min_top1,
                                   "max_ppl_change": args.max_ppl_change, "min_greedy_match": args.min_greedy_match,
                                   "min_batched_alone": args.min_batched_alone})
    report = verify(args.models, thresholds=thresholds, text_files=args.text, text_tokens=args.text_tokens,
                    window=args.window, greedy_new=args.greedy_tokens, threads=args.threads, backends=args.backends,
                    providers=args.providers, tokenizer=load_tokenizer(path=args.tokenizer_file),
                    verify_weights=not args.no_verify_weights,
                    progress=progress, tf32=args.tf32)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print(format_report(report))
    n = len(report["targets"])
    if report["failures"]:
        for f in report["failures"]:
            print(f"FAIL {f}", file=sys.stderr)
        print(f"verify failed: {len(report['failures'])} checks missed their thresholds on "
              f"{sum(1 for t in report['targets'] if t['failures'])} of {n} targets{tf32_note(report)}",
              file=sys.stderr)
        return 1
    print(f"verify passed: {n} targets match {report['reference']['label']} within thresholds "
          f"in {report['seconds']:.1f} s{tf32_note(report)}", file=sys.stderr)
    return 0
