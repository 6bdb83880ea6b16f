"""The OpenAI API's request and response shapes: validating /v1/completions and /v1/chat/completions bodies into
token ids and SamplingParams, OpenAI-shaped errors, and the legacy `logprobs` object.

Completion fields: `model`, `prompt` (a string, a list of strings, or token ids: a list of ints or a list of
lists), `max_tokens` (default 16; 0 only with `echo`), `temperature` (0..2, 0 = greedy), `top_p`, `stop` (a string
or up to 4), `seed`, `n` (1 only), `stream`, `stream_options.include_usage`, `user` (ignored), `echo` (the prompt
before the completion), `logprobs` (0..5 alternatives per token); the common extensions `top_k` and
`repetition_penalty`; and OpenAI fields this server does not implement only at their no-op values (`best_of` 1,
`presence_penalty` / `frequency_penalty` 0, `logit_bias` empty, `suffix` null). Chat takes `messages` instead of
`prompt` (rendered by a ChatTemplate, runtime/serve/chat.py), `max_completion_tokens` as well as `max_tokens`,
and `logprobs` false / `top_logprobs` null only. Any other field is a 400 naming it.

Legacy logprobs (`LogprobsWriter`): `tokens` are each token's text, or `bytes:\\xNN...` when its bytes are not
whole UTF-8 characters (a character split over tokens), as OpenAI writes them; `text_offset` is where each token
starts in the choice's text, counted in characters: a token that ends inside a character starts where that
character does, and the next token (which completes it) starts there too.
"""
from __future__ import annotations

import codecs
import json

from fastapi.responses import JSONResponse

from ..generation import GenerationError, SamplingParams, check_context
from ..sampling import MAX_LOGPROBS, SamplingError


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body, status_code=e.status, headers=e.headers)


# OpenAI fields accepted only at the value that makes them a no-op
NOOP_FIELDS = {"best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},)}
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options",
                 "user", "top_k", "repetition_penalty"} | set(NOOP_FIELDS)
COMPLETION_NOOPS = {**NOOP_FIELDS, "suffix": (None, "")}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "logprobs", "suffix"}
CHAT_NOOPS = {**NOOP_FIELDS, "logprobs": (None, False), "top_logprobs": (None, 0)}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
API_NAMES = {"max_new_tokens": "max_tokens"}  # SamplingParams field -> request field, where they differ
JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object", list: "array"}


def field(body: dict, name: str, types: tuple, default=None):
    """body[name] if it has one of `types` (null -> default); a 400 naming the field otherwise."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        want = " or ".join(JSON_TYPES[t] for t in types)
        raise APIError(400, f"{name} must be {'an' if want[0] in 'aeiou' else 'a'} {want}, got "
                            f"{json.dumps(value)[:80]}",
                       param=name, code="invalid_type")
    return value


def _number(body: dict, name: str, default: float) -> float:
    """A numeric field as a float; a 400 naming the field when it is not a number or too large for one."""
    value = field(body, name, (int, float), default)
    try:
        return float(value)
    except OverflowError:
        raise APIError(400, f"{name} is too large ({str(value)[:20]}...)", param=name, code="invalid_value") from None


def check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise APIError(400, message, param=name, code="invalid_value")


def _common(body, model_name: str, known: set, noops: dict) -> None:
    """The checks every route makes first: a JSON object, known fields, no-op fields at no-op values, the model."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}; this server accepts "
                            f"{', '.join(sorted(known))}", param=unknown[0], code="unknown_parameter")
    for name, noop in noops.items():
        if name in body and body[name] not in noop:
            raise APIError(400, f"{name}={json.dumps(body[name])[:80]} is not supported by this server; leave it out "
                                f"(or send {json.dumps(noop[0])})", param=name, code="unsupported_parameter")
    model = field(body, "model", (str,))
    if model is None:
        raise APIError(400, f"model is required; this server serves {model_name!r}", param="model")
    if model != model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves {model_name!r} (GET /v1/models)",
                       param="model", code="model_not_found")
    n = field(body, "n", (int,), 1)
    check(n == 1, "n", f"n={n} is not supported: this server returns one choice per prompt (n=1); "
                       f"send the request n times with different seeds instead")


def _sampling(body: dict, max_tokens: int, stop_extra=(), **extra) -> tuple[SamplingParams, dict]:
    """SamplingParams from the sampling fields, and the stream options {"stream", "include_usage"}."""
    temperature = _number(body, "temperature", 1.0)
    # the API's range; SamplingParams checks the rest of every field below
    check(temperature <= 2, "temperature", f"temperature must be in 0..2 (0 = greedy), got {temperature}")
    top_p = _number(body, "top_p", 1.0)
    top_k = field(body, "top_k", (int,), 0)
    penalty = _number(body, "repetition_penalty", 1.0)
    seed = field(body, "seed", (int,))
    check(seed is None or seed >= 0, "seed", f"seed must be >= 0, got {seed}")
    stop = field(body, "stop", (str, list), ())
    stop = [stop] if isinstance(stop, str) else stop
    check(len(stop) <= 4 and all(isinstance(s, str) for s in stop), "stop",
          f"stop must be a string or a list of at most 4 strings, got {json.dumps(stop)[:80]}")
    stream = field(body, "stream", (bool,), False)
    options = field(body, "stream_options", (dict,), {})
    check(not options or stream, "stream_options", "stream_options is only allowed with stream: true")
    check(set(options) <= {"include_usage"} and isinstance(options.get("include_usage", False), bool),
          "stream_options", f"stream_options accepts only include_usage (a boolean), got {json.dumps(options)[:80]}")
    field(body, "user", (str,))
    try:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=penalty, seed=seed, stop=(*stop, *stop_extra), **extra)
    except SamplingError as e:  # the API calls max_new_tokens max_tokens
        name = API_NAMES.get(e.field, e.field)
        raise APIError(400, str(e).replace(e.field, name), param=name, code="invalid_value") from None
    return params, {"stream": stream, "include_usage": bool(options.get("include_usage"))}


def _fit(prompts: list[list[int]], max_tokens: int, block_size: int) -> None:
    for i, ids in enumerate(prompts):
        try:
            check_context(len(ids), max_tokens, block_size, f"prompt {i}", "lower max_tokens or shorten the prompt",
                          "max_tokens")
        except GenerationError as e:  # OpenAI's wording first: clients look for it
            raise APIError(400, f"This model's maximum context length is {block_size} tokens; {e}",
                           param="max_tokens", code="context_length_exceeded") from None


def parse_completion_request(body, model_name: str, config, tokenizer, prompt_logits: str | None = None
                             ) -> tuple[list[list[int]], SamplingParams, dict]:
    """Validate a /v1/completions body -> (prompt ids per prompt, params, {"stream", "include_usage", "echo"}).
    prompt_logits: None when the model returns every prompt position's logits; else why not (echo + logprobs
    needs them)."""
    _common(body, model_name, COMPLETION_FIELDS, COMPLETION_NOOPS)
    echo = field(body, "echo", (bool,), False)
    logprobs = field(body, "logprobs", (int,))
    check(logprobs is None or 0 <= logprobs <= MAX_LOGPROBS, "logprobs",
          f"logprobs must be an integer in 0..{MAX_LOGPROBS} (alternatives per token), got {logprobs}")
    max_tokens = field(body, "max_tokens", (int,), 16)
    check(max_tokens >= 1 or echo and max_tokens == 0, "max_tokens",
          f"max_tokens must be >= 1 (0 only with echo: true, to score the prompt), got {max_tokens}")
    if echo and logprobs is not None and prompt_logits:
        raise APIError(400, f"echo with logprobs needs the log-probabilities of every prompt token, but {prompt_logits}",
                       param="echo", code="unsupported_parameter")
    params, opts = _sampling(body, max_tokens, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None)
    prompts = _prompt_ids(body.get("prompt"), config, tokenizer)
    _fit(prompts, max_tokens, config.block_size)
    return prompts, params, {**opts, "echo": echo}


def parse_chat_request(body, model_name: str, config, tokenizer, template) -> tuple[list[int], SamplingParams, dict]:
    """Validate a /v1/chat/completions body -> (the rendered prompt's ids, params, {"stream", "include_usage"})."""
    _common(body, model_name, CHAT_FIELDS, CHAT_NOOPS)
    messages = field(body, "messages", (list,))
    check(bool(messages) and all(isinstance(m, dict) for m in messages), "messages",
          f"messages must be a non-empty list of {{role, content}} objects, got {json.dumps(messages)[:80]}")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = field(body, name, (int,), 16)
    check(max_tokens >= 1, name, f"{name} must be >= 1, got {max_tokens}")
    params, opts = _sampling(body, max_tokens, stop_extra=template.stop)
    try:
        text = template.render(messages)
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from None
    ids = tokenizer.encode(text, allowed_special="all")
    _check_vocab(ids, config, "the rendered messages", "messages")
    _fit([ids], max_tokens, config.block_size)
    return ids, params, opts


def _prompt_ids(prompt, config, tokenizer) -> list[list[int]]:
    """prompt (string | [string] | [int] | [[int]]) -> token ids per prompt, each non-empty and in the vocabulary."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(p, str) or (isinstance(p, list) and all(_is_id(t) for t in p)) for p in prompt):
        raise APIError(400, f"prompt must be a non-empty string, a list of strings, a list of token ids or a list of "
                            f"lists of token ids, got {json.dumps(prompt)[:80]}", param="prompt", code="invalid_type")
    ids = [tokenizer.encode(p, allowed_special="all") if isinstance(p, str) else p for p in prompt]
    for i, p in enumerate(ids):
        if not p:
            raise APIError(400, f"prompt {i} is empty; give at least one token", param="prompt", code="invalid_value")
        _check_vocab(p, config, f"prompt {i}", "prompt")
    return ids


def _check_vocab(ids: list[int], config, what: str, param: str) -> None:
    """A 400 naming the first token id outside the model's vocabulary (a small model, text it never saw)."""
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        raise APIError(400, f"{what} has token id {bad[0]}, outside this model's vocabulary 0..{config.vocab_size - 1}; "
                            f"use tokens (or text) within it", param=param, code="invalid_value")


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def sse(event: dict) -> str:
    """One server-sent event as OpenAI sends it: `data: {json}` and a blank line."""
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"


class LogprobsWriter:
    """One choice's legacy `logprobs` object, written as its tokens arrive (streamed: one piece per chunk), with
    text offsets continuing over the pieces (module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0  # characters of the choice's text before the next token

    def token_text(self, token: int) -> str:
        raw = self.tokenizer.decode_single_token_bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def add(self, ids: list[int], entries: list | None) -> dict:
        """The legacy object for these tokens; entries: a TokenLogprob per token (None: unscored, the first prompt
        token; entries None: every token unscored, an echoed prompt without logprobs)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for k, t in enumerate(ids):
            lp = entries[k] if entries is not None else None
            out["tokens"].append(self.token_text(t))
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            out["top_logprobs"].append(None if lp is None else {self.token_text(i): v for i, v in lp.top})
            out["text_offset"].append(self.chars)
            self.chars += len(self.decoder.decode(self.tokenizer.decode_single_token_bytes(t)))
        return out
