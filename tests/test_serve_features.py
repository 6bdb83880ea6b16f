"""The server's chat, logprobs / echo, /metrics and request log, against the real client libraries on loopback:
the official `openai` client, prometheus_client's text parser, and torch's log_softmax for the values."""
from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from test_serve_server import MODEL, client, serve  # noqa: E402

from runtime.serve.api import APIError, parse_completion_request  # noqa: E402
from runtime.serve.chat import ChatTemplate  # noqa: E402
from runtime.serve.logs import JSONFormatter, RequestRecord  # noqa: E402
from runtime.serve.server import prompt_logits_missing  # noqa: E402

# the tiny model's 512-id vocabulary holds single characters and a few pairs: the default template's role names
# ("system: ...") tokenize past it, so the live servers here render contents only, one per line
SHORT = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
MESSAGES = [{"role": "system", "content": "(a, b)"}, {"role": "user", "content": "a b c"}]


@pytest.fixture(scope="module")
def server(tiny_onnx_dir, tokenizer):
    with serve(tiny_onnx_dir, tokenizer, chat_template=ChatTemplate(SHORT, ["\n\n"], "short")) as (url, app):
        yield url, app


def test_the_default_chat_template_is_a_plain_transcript():
    t = ChatTemplate()
    assert t.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]) == \
        "system: Be brief.\nuser: Hi\nassistant:"
    assert t.stop == ("\nuser:", "\nsystem:", "\nassistant:")
    assert t.render([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) \
        == "user: ab\nassistant:"
    with pytest.raises(ValueError, match="could not render"):
        ChatTemplate("{{ raise_exception('no system messages') }}").render(MESSAGES)
    with pytest.raises(ValueError, match="chat template bad"):
        ChatTemplate("{% for %}", name="bad")


def test_chat_completion_is_the_rendered_prompts_completion(server):
    url, _ = server
    c = client(url)
    prompt = "(a, b)\na b c\n"
    ref = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=["\n\n"])
    r = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.choices[0].text
    assert r.choices[0].finish_reason == ref.choices[0].finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.usage.prompt_tokens, ref.usage.completion_tokens)
    chunks = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == ref.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_chat_errors_are_openai_shaped(server):
    url, _ = server
    for body, param in (({"model": MODEL, "messages": []}, "messages"),
                        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages"),
                        ({"model": MODEL, "messages": MESSAGES, "logprobs": True}, "logprobs"),
                        ({"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens"),
                        # "system" tokenizes past the tiny model's 512 ids: a 400, not a 500 from inside generation
                        ({"model": MODEL, "messages": [{"role": "user", "content": "system"}]}, "messages"),
                        ({"model": "gpt-4", "messages": MESSAGES}, "model")):
        r = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


def test_a_chat_templates_stop_string_ends_the_reply(server, tiny_onnx_dir, tokenizer):
    url, _ = server
    full = client(url).completions.create(model=MODEL, prompt="a b c\n", max_tokens=10, temperature=0).choices[0].text
    stop = full[3:5]
    with serve(tiny_onnx_dir, tokenizer, chat_template=ChatTemplate(SHORT, [stop], "test")) as (url2, _):
        r = client(url2).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a b c"}],
                                                 max_tokens=10, temperature=0)
    assert r.choices[0].message.content == full[:full.find(stop)] and r.choices[0].finish_reason == "stop", (full, stop)


def torch_logprobs(model, ids):
    import torch

    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0].double(), -1).numpy()


def test_echo_logprobs_equal_torch_and_score_a_prompt(server, tiny_model, tokenizer):
    url, _ = server
    c = client(url)
    prompt = "a b c (a, b)"
    ids = tokenizer.encode(prompt)
    assert max(ids) < 512
    # lm-evaluation-harness's loglikelihood request: echo the prompt, generate nothing, read its logprobs
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    ch = r.choices[0]
    assert ch.text == prompt and r.usage.completion_tokens == 0 and ch.finish_reason == "length"
    lp = ch.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in ids] and lp.token_logprobs[0] is None
    assert lp.text_offset == [len(tokenizer.decode(ids[:k])) for k in range(len(ids))]
    ref = torch_logprobs(tiny_model, ids)
    got, want = np.array(lp.token_logprobs[1:]), ref[np.arange(len(ids) - 1), ids[1:]]
    assert np.abs(got - want).max() < 1e-4, f"prompt logprobs: max|Δ|={np.abs(got - want).max():.2e}"
    # generated tokens too, with 5 alternatives each; streamed the same
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=5, echo=True, logprobs=5, temperature=0)
    ch, n = r.choices[0], len(ids)
    assert ch.text.startswith(prompt) and len(ch.logprobs.tokens) == n + 5
    full = ids + [tokenizer.encode_single_token(t) if not t.startswith("bytes:") else None
                  for t in ch.logprobs.tokens[n:]]
    ref = torch_logprobs(tiny_model, full)
    for k in range(n, n + 5):
        assert abs(ch.logprobs.token_logprobs[k] - ref[k - 1, full[k]]) < 1e-4, k
        top = ch.logprobs.top_logprobs[k]
        assert len(top) == 5 and max(top.values()) == pytest.approx(ref[k - 1].max(), abs=1e-4)
    chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=5, echo=True, logprobs=5,
                                       temperature=0, stream=True))
    streamed = {k: sum((getattr(x.choices[0].logprobs, k) for x in chunks if x.choices[0].logprobs), [])
                for k in ("tokens", "token_logprobs", "text_offset")}
    assert "".join(x.choices[0].text for x in chunks) == ch.text
    assert streamed == {k: getattr(ch.logprobs, k) for k in streamed}


def test_echo_with_logprobs_needs_every_positions_logits(tokenizer):
    last = SimpleNamespace(artifact=SimpleNamespace(logits="last"), path="out/last")
    reason = prompt_logits_missing(last)
    assert "re-export it with --logits all" in reason and prompt_logits_missing(SimpleNamespace()) is None
    config = SimpleNamespace(vocab_size=512, block_size=128)
    body = {"model": MODEL, "prompt": [1, 2], "echo": True, "logprobs": 0, "max_tokens": 0}
    with pytest.raises(APIError) as e:
        parse_completion_request(body, MODEL, config, tokenizer, reason)
    assert e.value.status == 400 and "--logits all" in str(e.value) and e.value.body["error"]["param"] == "echo"
    parse_completion_request({**body, "logprobs": None}, MODEL, config, tokenizer, reason)  # echo alone is fine


def test_metrics_in_prometheus_text_format(server):
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = server
    c = client(url)
    c.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4, temperature=0)
    c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0)
    httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": [1]})
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("nanogpt_requests_total", (("route", "/v1/completions"), ("status", "200")))] >= 1
    assert samples[("nanogpt_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))] >= 1
    assert samples[("nanogpt_requests_total", (("route", "/v1/completions"), ("status", "404")))] >= 1
    assert samples[("nanogpt_time_to_first_token_seconds_count", ())] >= 2
    assert samples[("nanogpt_time_per_output_token_seconds_count", ())] >= 3 + 2
    assert samples[("nanogpt_generation_tokens_total", ())] >= 4
    assert samples[("nanogpt_batch_size_count", ())] >= 4
    assert ("nanogpt_queue_depth", ()) in samples and ("nanogpt_running_rows", ()) in samples


def test_one_log_line_per_request(server, caplog):
    url, _ = server
    with caplog.at_level(logging.INFO, logger="nanogpt_deploy.requests"):
        client(url).completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4, temperature=0)
        httpx.get(f"{url}/v1/models/nope")
        # the record is finished once the response has been sent, which the client may see first: wait for it.
        # The server is the module's: an earlier test's /metrics or /health line can land here late; not ours.
        for _ in range(200):
            records = [r for r in caplog.records if r.name == "nanogpt_deploy.requests"
                       and not r.getMessage().startswith(("GET /metrics ", "GET /health "))]
            lines = [r.getMessage() for r in records]
            if len(lines) >= 2:
                break
            time.sleep(0.01)
    assert len(lines) == 2, lines
    assert lines[0].startswith("POST /v1/completions 200 prompt_tokens=3 completion_tokens=4 ttft=")
    assert lines[1].startswith("GET /v1/models/{model} 404 ")
    as_json = json.loads(JSONFormatter().format(records[0]))
    assert as_json["route"] == "/v1/completions" and as_json["completion_tokens"] == 4 and as_json["ttft_s"] > 0
    assert RequestRecord("GET").line() == "GET unmatched 0 prompt_tokens=0 completion_tokens=0 ttft=- total=0.000s"
