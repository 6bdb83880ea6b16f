"""`nanogpt-deploy bench MODEL...`: time to first token, decode tokens/s, latency p50/p95 and peak RSS per backend.

    nanogpt-deploy bench out/gpt2 out/gpt2-int8 out/gpt2-int4 --threads 2
    nanogpt-deploy bench out/ --prompt-len 32,512 --batch 1,8 --repeats 5 --plot bench.png --json > bench.json

MODEL is an exported folder, a folder of exported folders (one per variant), an engine, or a checkpoint
(torch). Every backend in --backends and provider in --providers that can run here is timed; the
others are skipped with a note. Each target runs in its own process (runtime/tools/bench.py). The table goes
to stdout (or one JSON document with --json), the progress bar and summary line to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .args import add_run_flags, int_in, positive_int


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 32,512)") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers (e.g. 32,512)")
    return values


def name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="exported folder, folder of exported folders, engine, or checkpoint (torch backend)")
    p.add_argument("--backends", type=name_list, default=["onnxruntime", "torch", "tensorrt"],
                   help="comma-separated: onnxruntime,torch,tensorrt (default: all; absent ones are skipped)")
    p.add_argument("--providers", type=name_list, default=["cpu", "cuda"],
                   help="comma-separated: cpu,cuda (default: both; cuda is skipped without a GPU)")
    p.add_argument("--prompt-len", type=int_list, default=[32], metavar="N[,N...]", help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int_list, default=[128], metavar="N[,N...]", help="generated tokens per row")
    p.add_argument("--batch", type=int_list, default=[1], metavar="N[,N...]", help="rows per batch")
    p.add_argument("--warmup", type=int_in(0, None, "a run count"), default=1, help="untimed runs per case")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per case; medians are reported")
    add_run_flags(p, tf32=True)
    p.add_argument("--draft", metavar="DIR", default=None,
                   help="also time speculative decoding with this draft export (e.g. the int8 folder) on every "
                        "onnxruntime target keeping --speculate + 1 logits positions (--logits last:5); "
                        "batches too on a "
                        "--kv-cache concat pair")
    p.add_argument("--speculate", type=int_in(1, 64, "a guess count"),
                   default=4, metavar="K", help="guesses per round with --draft")
    p.add_argument("--plot", metavar="PNG", default=None, help="write tokens/s vs context and latency percentiles here")
    p.add_argument("--json", action="store_true", help="print the whole report as one JSON document")


class ProgressBar:
    """`[#######.....] 12/40 onnxruntime cpu int8` on stderr: redrawn on a terminal, a line per 10% otherwise."""

    def __init__(self, stream=None, width: int = 28):
        self.stream = stream or sys.stderr
        self.width, self.tty = width, self.stream.isatty()
        self.t0, self.last_decile = time.perf_counter(), -1

    def __call__(self, done: int, total: int, label: str) -> None:
        frac = done / total if total else 1.0
        bar = "#" * round(frac * self.width) + "." * (self.width - round(frac * self.width))
        text = f"[{bar}] {done}/{total} {label} ({time.perf_counter() - self.t0:.0f} s)"
        if self.tty:
            self.stream.write("\r" + text.ljust(100) + ("\n" if done == total else ""))
        elif int(frac * 10) > self.last_decile:
            self.last_decile = int(frac * 10)
            self.stream.write(text + "\n")
        self.stream.flush()


def run(args) -> int:
    from ..tools.bench import BenchError, cases, find_targets, run_bench
    from ..tools.bench_report import check_plot_path, format_table, plot_report

    if args.repeats < 1 or args.warmup < 0:
        raise BenchError(f"--repeats {args.repeats} / --warmup {args.warmup}: need at least 1 repeat and "
                         "0+ warm-up runs")
    plot = check_plot_path(args.plot) if args.plot else None  # a bad path fails now, not after the timing
    targets, notes = find_targets(args.models, args.backends, args.providers, args.draft, args.speculate)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    todo = cases(args.prompt_len, args.new_tokens, args.batch)
    print(f"timing {len(targets)} targets x {len(todo)} cases ({args.warmup} warm-up + {args.repeats} runs each)",
          file=sys.stderr)
    report = run_bench(targets, todo, args.warmup, args.repeats, args.threads, progress=ProgressBar(),
                       verify_weights=not args.no_verify_weights, tf32=args.tf32)
    report["skipped"] = notes
    if plot:
        report["plot"] = str(plot)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print(format_table(report))
    for f in report["failed"]:
        print(f"error: {f['label']} failed: {f['error']}", file=sys.stderr)
    print(summary(report), file=sys.stderr)
    if plot:  # last: the results are out even if plotting fails
        try:
            plot_report(report, plot)
        except Exception as e:  # noqa: BLE001 - matplotlib raises many kinds
            raise BenchError(f"--plot {plot}: the plot could not be written ({type(e).__name__}: {e}); the results "
                             f"above are complete") from e
    return 1 if report["failed"] else 0


def summary(report: dict) -> str:
    timed = [(c.get("decode_tok_s", 0), r["label"], c["case"]) for r in report["results"] for c in r["cases"]
             if "decode_tok_s" in c]
    m = report["machine"]
    where = f"{m['cpu']}, load {m['load_before'][0] if m.get('load_before') else '?'}"
    if not timed:
        return f"{len(report['results'])} targets timed in {report['seconds']:.0f} s [{where}]"
    rate, label, case = max(timed, key=lambda t: t[0])
    return (f"{len(report['results'])} targets x {len(report['settings']['cases'])} cases in "
            f"{report['seconds']:.0f} s; "
            f"fastest decode {rate:.1f} tok/s [{label}, batch {case['batch']}, prompt {case['prompt']}] [{where}]"
            f"{tf32_note(report['results'])}")


def tf32_note(results: list[dict]) -> str:
    """Which GPU targets ran fp32 MatMuls in TF32 (nothing to say when none ran on a GPU)."""
    gpu = [r for r in results if r.get("target", {}).get("provider") == "cuda"]
    on = [r["label"] for r in gpu if r.get("tf32")]
    return f"; TF32 on: {', '.join(on)}" if on else "; TF32 off" if gpu else ""
