"""Log-probabilities (SamplingParams.logprobs / prompt_logprobs) against torch's log_softmax of the same sequence.

The tiny random model: the onnxruntime backend generates with logprobs, and the torch reference runs the prompt +
completion in one forward pass; every reported value (chosen token and top alternatives, prompt and generated
positions) must equal log_softmax of the reference logits at the position before the token.
"""
from __future__ import annotations

import numpy as np
import pytest

from runtime.backends import load_backend
from runtime.generation import GenerationError, SamplingParams, generate

ATOL = 1e-4
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [7, 7, 300, 12]]


def reference_logprobs(model, ids: list[int]) -> np.ndarray:
    """(T, V) float64 log_softmax of torch's logits over `ids` (row t predicts ids[t + 1])."""
    import torch

    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0].double(), dim=-1).numpy()


def check_against(ref: np.ndarray, entries, ids: list[int], start: int, what: str) -> None:
    for k, (lp, tok) in enumerate(zip(entries, ids[start:])):
        t = start + k - 1  # the position whose logits predict this token
        assert lp.token == tok, (what, k, lp.token, tok)
        d = abs(lp.logprob - ref[t, tok])
        assert d < ATOL, f"{what} token {k}: |Δ|={d:.2e} > {ATOL}"
        want = np.argsort(-ref[t], kind="stable")[:len(lp.top)]
        assert [i for i, _ in lp.top] == want.tolist(), (what, k, lp.top, want)
        d = max((abs(v - ref[t, i]) for i, v in lp.top), default=0.0)
        assert d < ATOL, f"{what} token {k} alternatives: max|Δ|={d:.2e} > {ATOL}"


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_logprobs_equal_torch_log_softmax(tiny_model, tiny_onnx_dir, temperature):
    backend = load_backend("onnxruntime", tiny_onnx_dir)
    params = SamplingParams(max_new_tokens=6, temperature=temperature, top_k=20, seed=3, logprobs=5,
                            prompt_logprobs=True, stop_token_ids=())
    for c in generate(backend, None, PROMPTS, params):  # batched: left padding must not shift a row
        ids = c.prompt_ids + c.token_ids
        ref = reference_logprobs(tiny_model, ids)
        assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(c.prompt_ids)
        check_against(ref, c.prompt_logprobs[1:], ids, 1, "prompt")
        assert len(c.logprobs) == len(c.token_ids) == 6
        # the model's distribution, before temperature and top-k: the same whatever the sampling
        check_against(ref, c.logprobs, ids, len(c.prompt_ids), "generated")


def test_logprobs_cost_nothing_unless_asked_and_a_prompt_can_be_scored_alone(tiny_model, tiny_onnx_dir):
    backend = load_backend("onnxruntime", tiny_onnx_dir)
    plain, scored = generate(backend, None, PROMPTS, [SamplingParams(max_new_tokens=3, temperature=0),
                                                      SamplingParams(max_new_tokens=0, prompt_logprobs=True)])
    assert plain.logprobs is None and plain.prompt_logprobs is None
    assert scored.token_ids == [] and scored.finish_reason == "length"
    check_against(reference_logprobs(tiny_model, PROMPTS[1]), scored.prompt_logprobs[1:], PROMPTS[1], 1, "prompt")
    with pytest.raises(ValueError, match="logprobs must be an integer in 0..5"):
        SamplingParams(logprobs=6)


@pytest.mark.parametrize("draft_weights", ["same", "other"])
def test_logprobs_under_speculative_decoding_are_the_targets(tiny_model, tiny_onnx_dir, tmp_path, draft_weights):
    """A draft with the target's weights has every guess accepted; another random model has most rejected, so the
    logprobs of a rejected round (the target's correction token, the rewound positions) are checked too."""
    from export.onnx import export_onnx
    from model import GPT
    from runtime.generation import SpeculativeGeneration

    draft_dir = tiny_onnx_dir
    if draft_weights == "other":
        draft_dir = export_onnx(GPT.from_pretrained("random:tiny@1"), tmp_path / "other", logits="last").parent
    target, draft = load_backend("onnxruntime", tiny_onnx_dir), load_backend("onnxruntime", draft_dir)
    params = SamplingParams(max_new_tokens=12, temperature=0, logprobs=2, prompt_logprobs=True, stop_token_ids=())
    g = SpeculativeGeneration(target, None, PROMPTS[:1], params, draft, speculate=3, adaptive=False)
    list(g)
    [c] = g.completions
    if draft_weights == "same":
        assert g.stats["accepted"] == g.stats["drafted"] > 0, g.stats
    else:
        assert g.stats["accepted"] < g.stats["drafted"], g.stats  # rejected guesses were rolled back
    ids = c.prompt_ids + c.token_ids
    ref = reference_logprobs(tiny_model, ids)
    check_against(ref, c.prompt_logprobs[1:], ids, 1, "prompt")
    assert len(c.logprobs) == len(c.token_ids) == 12
    check_against(ref, c.logprobs, ids, len(c.prompt_ids), "generated")


def test_prompt_logprobs_need_every_positions_logits(tiny_model, tmp_path):
    from export.onnx import export_onnx

    export_onnx(tiny_model, tmp_path, logits="last")
    backend = load_backend("onnxruntime", tmp_path)
    with pytest.raises(GenerationError, match="re-export it with --logits all"):
        generate(backend, None, PROMPTS[:1], SamplingParams(max_new_tokens=1, prompt_logprobs=True))
    [c] = generate(backend, None, PROMPTS[:1], SamplingParams(max_new_tokens=2, temperature=0, logprobs=1))
    assert len(c.logprobs) == 2  # generated tokens' logprobs need the last position only
