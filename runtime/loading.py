"""Loading what a command runs on: a backend, and with `--draft` the draft beside it, checked as a pair.

    from runtime.loading import load_pair
    target, draft = load_pair("onnxruntime", "out/tiny", "out/tiny-int8", speculate=4)  # draft None without one
"""
from __future__ import annotations

from .backends import load_backend
from .generation import DEFAULT_SPECULATE, GenerationError, check_pair


def load_pair(backend: str, model: str, draft: str | None, speculate: int | None = None, **options):
    """(target, draft) as the CLIs load them; draft is None without `draft`. With one, both sessions stop
    their threads spinning between runs (they take turns on the same cores) and the pair is checked now,
    before any request."""
    if speculate is not None and not draft:
        raise GenerationError("--speculate needs --draft DIR (the model that guesses the tokens)")
    if draft and backend == "onnxruntime":
        options["spinning"] = False
    target = load_backend(backend, model, **options)
    if not draft:
        return target, None
    guesser = load_backend(backend, draft, **options)
    check_pair(target, guesser, DEFAULT_SPECULATE if speculate is None else speculate)
    return target, guesser
