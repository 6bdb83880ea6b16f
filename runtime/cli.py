"""`nanogpt-deploy`: one command, subcommands.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; the
module is imported to build the parser, so it must import heavy libraries (torch, onnx, onnxruntime)
inside `run`, never at the top.

    nanogpt-deploy export random:tiny --out out/tiny
    nanogpt-deploy generate out/tiny --prompt "def main():"
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("runtime.cli_demo", "the main job: embedded checkpoint -> ONNX export -> parity -> generation"),
    "export": ("export.cli_export", "export a checkpoint to ONNX (fp32/fp16/int8/int4), validated against torch"),
    "generate": ("runtime.cli_generate", "generate text from an exported model (or a checkpoint, torch backend)"),
    "bench": ("runtime.cli_bench", "time to first token, decode tok/s, latency percentiles per backend"),
    "verify": ("runtime.cli_verify", "parity report across backends and variants"),
    "build-engine": ("export.cli_engine", "compile model.onnx into a TensorRT engine"),
    "serve": ("runtime.cli_serve", "OpenAI-compatible HTTP server"),
    "fetch-tokenizer": ("runtime.cli", "fetch and verify the GPT-2 tokenizer ranks (needs the package registry)"),
}


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


def add_arguments(p: argparse.ArgumentParser) -> None:  # fetch-tokenizer
    p.add_argument("--out", default=None, help="where to write gpt2.tiktoken (default: the cache)")
    p.add_argument("--sdist", default=None, help="a local openai-whisper sdist to take it from (offline)")


def run(args) -> int:  # fetch-tokenizer
    from .tokenizer import fetch_ranks

    path = fetch_ranks(args.out, args.sdist)
    print(f"GPT-2 tokenizer ranks verified at {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanogpt-deploy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            if e.name and e.name.startswith(module):  # not written yet
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # a user's warning is one line, not the source line that raised it


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _warning_line
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return args._run(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:  # an optional dependency (torch in a `pip install '.[cpu]'`): name its extra
        from .backends import MISSING_HINTS

        dep = (e.name or "").split(".")[0]
        if dep not in MISSING_HINTS or getattr(args, "debug", False) or os.environ.get("NANOGPT_DEPLOY_DEBUG"):
            raise
        print(f"error: {args.command} needs {dep}, which is not installed; {MISSING_HINTS[dep]}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError, OSError) as e:
        # the project's errors (CheckpointError, ArtifactError, ...) carry the fix in their message;
        # --debug (where a command has it) or NANOGPT_DEPLOY_DEBUG=1 shows the traceback instead
        if getattr(args, "debug", False) or os.environ.get("NANOGPT_DEPLOY_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
