"""Sampling on crafted logits: greedy, temperature, top-k, top-p, repetition penalty, seeds, padded vocab."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from runtime.sampling import Sampler, SamplingParams, sample_next_token


def _draws(logits, params, n=4000, seed=0, seen=None):
    rng = np.random.default_rng(seed)
    return Counter(sample_next_token(np.asarray(logits, dtype=np.float32), params, rng, seen) for _ in range(n))


def test_greedy_is_argmax_and_leaves_logits_untouched():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    before = logits.copy()
    assert sample_next_token(logits, SamplingParams(temperature=0), np.random.default_rng(0)) == 1
    assert np.array_equal(logits, before)


def test_padded_vocab_rows_are_never_sampled():
    logits = np.zeros(8, dtype=np.float32)
    logits[6:] = 100.0  # rows 6, 7 are nanoGPT-style padding: huge logits must not matter
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=0)):
        s = Sampler(params, real_vocab_size=6)
        got = {s(logits) for _ in range(200)}
        assert max(got) < 6, f"{params}: sampled padded ids {sorted(got)}"


def test_top_k_keeps_exactly_the_k_largest():
    logits = [0.0, 5.0, 4.5, 4.0, 1.0]
    got = _draws(logits, SamplingParams(temperature=1.0, top_k=2))
    assert set(got) == {1, 2}, got
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_k=1), n=200)) == {1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.6, 0.25, 0.1, 0.05])
    logits = np.log(probs)
    # mass before each token: 0, 0.6, 0.85, 0.95 -> top_p 0.7 keeps {0, 1}; 0.5 keeps {0}; 0.9 keeps {0, 1, 2}
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.7))) == {0, 1}
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.5), n=300)) == {0}
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.9))) == {0, 1, 2}
    # renormalised within the kept set: 0.6 / 0.85 of draws are token 0
    got = _draws(logits, SamplingParams(temperature=1.0, top_p=0.7), n=20000)
    frac = got[0] / 20000
    assert abs(frac - 0.6 / 0.85) < 0.02, f"token 0 drawn {frac:.3f} of the time, expected {0.6 / 0.85:.3f}"


def test_top_k_then_top_p_combine():
    logits = np.log(np.array([0.05, 0.5, 0.3, 0.15]))
    # top_k 3 -> {1, 2, 3} renormalised (0.53, 0.32, 0.16); top_p 0.6 then keeps {1, 2}
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.6))) == {1, 2}


def test_temperature_matches_softmax_of_scaled_logits():
    logits = np.array([2.0, 1.0, 0.0])
    for t in (0.5, 2.0):
        p = np.exp(logits / t) / np.exp(logits / t).sum()
        got = _draws(logits, SamplingParams(temperature=t), n=20000, seed=1)
        freq = np.array([got[i] for i in range(3)]) / 20000
        assert np.max(np.abs(freq - p)) < 0.02, f"temperature {t}: frequencies {freq} vs softmax {p}"


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    greedy = SamplingParams(temperature=0, repetition_penalty=1.5)
    rng = np.random.default_rng(0)
    logits = np.array([2.0, 1.9, -1.0, -1.2], dtype=np.float32)
    assert sample_next_token(logits, greedy, rng, np.array([0])) == 1  # 2.0 / 1.5 = 1.33 < 1.9
    assert sample_next_token(logits, SamplingParams(temperature=0), rng, np.array([0])) == 0  # penalty 1: off
    negative = np.array([-1.0, -1.2, -5.0], dtype=np.float32)
    assert sample_next_token(negative, SamplingParams(temperature=0, repetition_penalty=1.5), rng, np.array([0])) == 1
    # the Sampler remembers prompt and output ids
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=100.0), real_vocab_size=4, prompt_ids=[0])
    positive = np.array([2.0, 1.9, 1.8, 1.7], dtype=np.float32)
    assert [s(positive) for _ in range(3)] == [1, 2, 3]


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = np.random.default_rng(0).normal(size=(50, 100)).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    run = lambda p: (lambda s: [s(row) for row in logits])(Sampler(p, real_vocab_size=100))  # noqa: E731
    assert run(params) == run(params)
    assert run(params) != run(SamplingParams(temperature=1.0, top_p=0.95, seed=8))


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(temperature=float("inf")), "temperature must be >= 0 and finite"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be > 0 and finite"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(stop=("",)), "stop strings must not be empty"),
])
def test_bad_params_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert message in str(e.value)
    assert repr(list(kwargs.values())[0]) in str(e.value) or "stop" in message


def test_stop_accepts_a_single_string_and_lists():
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[1]).stop_token_ids == (1,)


@pytest.mark.parametrize("kwargs", [dict(top_k=50), dict(top_p=0.9), dict(top_k=200, top_p=0.95), dict()])
def test_a_tiny_logit_difference_does_not_change_the_sampled_token(kwargs):
    """Backends (and a 1-token vs a 5-token step: speculative decoding) differ by ~1e-6 in the logits. The
    draw maps to a token through a cumulative sum over the candidates; in token-id order that only flips
    when the draw lands within ~1e-6 of a boundary, in value order near-equal candidates would swap."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=2000).astype(np.float32)
    logits[:40] = 6.0 + rng.normal(size=40).astype(np.float32) * 1e-6  # near-ties holding most of the mass
    params = SamplingParams(temperature=0.9, seed=0, **kwargs)
    same = 0
    for seed in range(300):
        noisy = logits + rng.normal(size=logits.size).astype(np.float32) * 1e-6
        a = sample_next_token(logits, params, np.random.default_rng(seed))
        b = sample_next_token(noisy, params, np.random.default_rng(seed))
        same += a == b
    assert same >= 299, same


@pytest.mark.parametrize("temperature", [5e-324, 1e-320, 1e-310, 1e-300, 1e-200, 1e-40, 1e-12])
@pytest.mark.parametrize("kwargs", [{}, {"top_k": 3}, {"top_p": 0.9}, {"repetition_penalty": 1.3}])
def test_tiny_temperatures_sample_the_argmax(temperature, kwargs):
    # logits / 5e-324 overflows to inf and inf - inf is NaN: every finite positive temperature must still give a
    # valid distribution, which below the logits' resolution puts all its mass on the argmax
    rng = np.random.default_rng(0)
    # the argmax 7.25 is one float32 step (4.8e-7) above the runner-up, beside huge and infinite logits
    logits = np.array([3.0, -1e30, 7.25, np.nextafter(np.float32(7.25), np.float32(0)), -np.inf, 1e-38, -2.0],
                      np.float32)
    want = 2
    params = SamplingParams(temperature=temperature, **kwargs)
    got = [sample_next_token(logits, params, rng, np.array([0], np.int64)) for _ in range(200)]
    bad = [t for t in got if t != want]
    assert not bad, f"T={temperature:g} {kwargs}: {len(bad)}/200 draws were not the argmax {want}: {sorted(set(bad))}"


@pytest.mark.parametrize("temperature", [1e-3, 0.1, 0.7, 1.0, 2.0, 1e3, 1e300])
def test_every_temperature_gives_valid_tokens(temperature):
    rng = np.random.default_rng(1)
    logits = np.random.default_rng(2).normal(0, 30, 50).astype(np.float32)
    got = [sample_next_token(logits, SamplingParams(temperature=temperature), rng) for _ in range(200)]
    outside = sorted(set(got) - set(range(50)))
    assert not outside, f"T={temperature:g}: tokens outside 0..49: {outside}"
