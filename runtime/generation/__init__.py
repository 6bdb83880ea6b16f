"""Token generation, written once above the backends: batching, sampling, stops, streaming, timings.

A batch of prompts of different lengths is left-padded into one prefill; each decode step then feeds one
token per row (or, with a draft model, a round of guesses checked in one target step: speculative.py).
Positions are `cumsum(mask) - 1`, so padding never shifts a row: under greedy an fp32 row gets the tokens
its prompt gets alone (int8 / int4 kernels may not, docs/serving.md "Batched is not alone"). Text is decoded
incrementally from token bytes, so a UTF-8 character split over tokens is never split across streamed
pieces. Rows stop independently (max_new_tokens, a stop token id, a stop string even when it spans
tokens, or `cancel(row)`).

    from runtime.generation import SamplingParams, generate, stream
    [c] = generate(backend, tokenizer, ["def main():"], SamplingParams(temperature=0, max_new_tokens=32))
    c.text, c.token_ids, c.finish_reason, c.timing.ttft_s, c.timing.decode_latencies_s

    for d in stream(backend, tokenizer, prompts, params):     # Delta(row, text, token_ids, finish_reason)
        print(d.text, end="", flush=True)

The package: rows.py (a request's row: validation, sampling, stops, text, timings), cache.py (a backend's
KV cache rows, mask and positions), engine.py (Generation: rows' lifecycle, `step()`), plain.py and
speculative.py (the two decoding strategies), depth.py (how many tokens a speculative round guesses).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..sampling import SamplingParams
from .engine import Generation
from .plain import PlainDecoding
from .rows import Completion, Delta, GenerationError, Prompt, Timing, check_context, fits_context
from .speculative import DEFAULT_SPECULATE, SpeculativeDecoding, SpeculativeGeneration, check_pair, draft_for

__all__ = ["SamplingParams", "Timing", "Completion", "Delta", "Generation", "GenerationError", "PlainDecoding",
           "SpeculativeDecoding", "SpeculativeGeneration", "DEFAULT_SPECULATE", "check_pair", "draft_for",
           "check_context", "fits_context", "generate", "stream", "make_generation", "summary_line"]


def make_generation(backend, tokenizer, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams],
                    draft=None, speculate: int | None = None, strict: bool = True) -> Generation:
    """A Generation, decoded speculatively with a `draft` backend (same output). strict=False: a draft that cannot
    speculate on this many prompts (a kv_cache="shared" pair, `draft_for`) is left out instead of refused."""
    if not strict:
        draft = draft_for(backend, draft, len(prompts))
    if draft is None:
        return Generation(backend, tokenizer, prompts, params)
    return SpeculativeGeneration(backend, tokenizer, prompts, params, draft,
                                 DEFAULT_SPECULATE if speculate is None else speculate)


def stream(backend, tokenizer, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams],
           draft=None, speculate: int | None = None) -> Iterator[Delta]:
    """Yield per-row Deltas as tokens are produced (see Generation for the arguments, make_generation for draft)."""
    return iter(make_generation(backend, tokenizer, prompts, params, draft, speculate))


def generate(backend, tokenizer, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams],
             draft=None, speculate: int | None = None) -> list[Completion]:
    """Run prompts to completion in one batch; one Completion per prompt, in order.

    Args:
        backend: a loaded Backend (runtime.backends.load_backend).
        tokenizer: a tiktoken Encoding, or None for token-id prompts.
        prompts: texts or token-id lists, of any lengths (left-padded into one batch).
        params: one SamplingParams for every row, or one per row.
        draft: a draft Backend for speculative decoding (the output stays the target's; several prompts need
            a pair that runtime.generation.speculative.batches, not a kv_cache="shared" one).
        speculate: tokens the draft guesses per round at most (default DEFAULT_SPECULATE; each round guesses
            0..speculate, whichever the measured acceptance and step costs make fastest).
    Returns:
        list of Completion(prompt_ids, token_ids, text, finish_reason, stop, timing).
    """
    g = make_generation(backend, tokenizer, prompts, params, draft, speculate)
    for _ in g:
        pass
    return g.completions


def summary_line(completions: Sequence[Completion], backend, seconds: float | None = None) -> str:
    """`128 tokens in 2.9 s, 44.1 tok/s [onnxruntime, CPUExecutionProvider, fp32]` (prefill included)."""
    n = sum(len(c.token_ids) for c in completions)
    s = seconds if seconds is not None else max((c.timing.total_s for c in completions), default=0.0)
    rate = n / s if s > 0 else 0.0
    return (f"{n} tokens in {s:.{1 if s >= 10 else 2}f} s, {rate:.1f} tok/s "
            f"[{backend.name}, {backend.provider}, {backend.precision}]")
