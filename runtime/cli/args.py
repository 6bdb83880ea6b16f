"""What the subcommands' parsers share: checked number types, the help formatter that shows defaults, and the
flag groups more than one subcommand takes (the model to run, how to run it, sampling, the tokenizer).

    from .args import add_model_flags, add_run_flags
    add_model_flags(p)            # MODEL --backend --provider --decode
    add_run_flags(p, tf32=True)   # --threads --no-verify-weights --tf32

Imports argparse and math only: every subcommand's module imports this to build its parser.
"""
from __future__ import annotations

import argparse
import math


def int_in(low: int, high: int | None = None, what: str = "a positive integer"):
    """An argparse type: an integer in low..high (argparse puts the flag's name before the message)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} is not {what}; give {low}..{high}" if high is not None else
                                             f"{value} is not {what}; give {low} or more")
        return value
    return parse


positive_int = int_in(1)


def float_in(low: float | None = None, high: float | None = None, what: str = "a number", above: bool = False):
    """An argparse type: a finite float in low..high (above=True: strictly more than low). `nan`, `inf` and
    `1e999` parse as floats, and a NaN passes every `<` check, so they are refused here, by name."""
    if low is None:
        span = "any finite number" if high is None else f"a finite number up to {high:g}"
    elif high is None:
        span = f"more than {low:g}" if above else f"{low:g} or more"
    else:
        span = f"more than {low:g}, up to {high:g}" if above else f"{low:g}..{high:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {span}") from None
        if not math.isfinite(value) or low is not None and (value < low or above and value == low) or \
                high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} is not {what}; give {span}")
        return value
    return parse


finite_float = float_in()


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends `(default: X)` to a flag's help. Not for a default of None, False or [] (an unset flag; where None
    means something, the help says what), nor where the help already speaks of its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default == []
        if unset or "default" in text or not action.option_strings:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        shown = shown.replace("%", "%%")  # the help string is %-formatted
        return f"{text} (default: {shown})" if text else f"default: {shown}"


# -- flag groups -------------------------------------------------------------------------------------------------

def add_model_flags(p: argparse.ArgumentParser) -> None:
    """MODEL and what runs it: --backend, --provider, --decode (generate, serve)."""
    p.add_argument("model", metavar="MODEL", help="exported folder or model.onnx (engine for tensorrt; any checkpoint "
                                                   "source for --backend torch)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "tensorrt"],
                   help="what runs MODEL")
    p.add_argument("--provider", default=None, choices=["cpu", "cuda"],
                   help="execution provider / torch device (default: cpu; tensorrt is always cuda)")
    p.add_argument("--decode", default="auto", choices=["auto", "graph", "static", "dynamic"],
                   help="onnxruntime, --kv-cache shared export: graph = replay decode steps as CUDA graphs (needs "
                        "--provider cuda), static = the same fixed-shape steps uncaptured, dynamic = per-step shapes; "
                        "auto = graph on CUDA, else dynamic")


def add_run_flags(p: argparse.ArgumentParser, tf32: bool = False) -> None:
    """How a loaded model runs: --threads, --no-verify-weights, and with tf32=True --tf32 (generate, serve, bench,
    verify)."""
    p.add_argument("--threads", type=int_in(1, 1024, "a thread count"),
                   default=None, help="intra-op CPU threads (default: the backend's choice)")
    p.add_argument("--no-verify-weights", action="store_true",
                   help="skip the sha256 check of model.onnx.data against the digest recorded at export (about 1 s "
                        "per 500 MB)")
    if tf32:
        p.add_argument("--tf32", action="store_true",
                       help="onnxruntime on CUDA: run fp32 MatMuls in TF32, faster and ~1e-3 off fp32")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --temperature, --top-k (generate, demo)."""
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate per prompt, at most")
    p.add_argument("--temperature", type=finite_float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int_in(0, None, "0 (off) or a count"), default=200, help="0 = off")


def add_tokenizer_flag(p: argparse.ArgumentParser) -> None:
    """--tokenizer-file (generate, serve, verify)."""
    p.add_argument("--tokenizer-file", default=None, help="gpt2.tiktoken to use (default: $NANOGPT_DEPLOY_TOKENIZER, "
                                                          "then the cache)")
