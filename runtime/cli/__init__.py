"""`nanogpt-deploy`: one command, subcommands.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`. Only the
chosen subcommand's module is imported (`nanogpt-deploy generate --help` imports neither torch nor fastapi),
and that module imports heavy libraries (torch, onnx, onnxruntime) inside `run`, never at the top. Flags
that several subcommands take are written once, in runtime/cli/args.py.

    nanogpt-deploy export random:tiny --out out/tiny
    nanogpt-deploy generate out/tiny --prompt "def main():"
    python -m runtime.cli generate out/tiny --prompt "def main():"      # the same, without the console script
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .args import DefaultsFormatter

# name -> (module, one-line help). Export's subcommands live in export/ (runtime never imports export: the
# names here are strings, imported only when chosen).
COMMANDS = {
    "demo": ("export.cli_demo", "the main job: embedded checkpoint -> ONNX export -> parity -> generation"),
    "export": ("export.cli_export", "export a checkpoint to ONNX (fp32/fp16/int8/int4), validated against torch"),
    "generate": ("runtime.cli.generate", "generate text from an exported model (or a checkpoint, torch backend)"),
    "bench": ("runtime.cli.bench", "time to first token, decode tok/s, latency percentiles per backend"),
    "verify": ("runtime.cli.verify", "parity report across backends and variants"),
    "build-engine": ("export.cli_engine", "compile model.onnx into a TensorRT engine"),
    "serve": ("runtime.cli.serve", "OpenAI-compatible HTTP server"),
    "fetch-tokenizer": ("runtime.cli.fetch_tokenizer",
                        "fetch and verify the GPT-2 tokenizer ranks (needs the package registry)"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: every subcommand is listed, but only the one argv names gets its flags (its module
    imported). Without argv, every subcommand's flags (every module imported)."""
    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    parser = argparse.ArgumentParser(prog="nanogpt-deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"nanogpt-deploy {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsFormatter)
        if chosen is None or name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def version() -> str:
    """The installed package's version (pyproject.toml's), or how to get one when running from a source tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("nanogpt-deploy")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # a user's warning is one line, not the source line that raised it


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _warning_line
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
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
        from ..backends import MISSING_HINTS

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
