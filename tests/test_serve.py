"""The OpenAI-compatible server, through the official `openai` client and raw HTTP on loopback.

Engines here decode eagerly (compile_decode=False): what is tested is the server, not the compiler."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import numpy as np
import pytest

from helpers import LiveServer, add_trace_index, metrics_of, sse_events, wait_until

openai = pytest.importorskip("openai")


def start(folder, api_key=None, **engine_kw):
    from glassforge.serve.app import create_app
    from glassforge.serve.engine import Engine

    engine = Engine(folder, **{"compile_decode": False, **engine_kw})
    return engine, LiveServer(create_app(engine, api_key=api_key))


@pytest.fixture(scope="module")
def live(random_model):
    engine, srv = start(random_model, max_batch=8)
    srv.engine = engine
    srv.model = engine.folder.name
    yield srv
    srv.stop()
    engine.close()


@pytest.fixture()
def client(live):
    return openai.OpenAI(base_url=live.base, api_key="anything", max_retries=0, timeout=60)


MSGS = [{"role": "user", "content": "Write a function that parses JSON."}]


def test_models(client, live):
    models = client.models.list().data
    assert [m.id for m in models] == [live.model]
    assert client.models.retrieve(live.model).id == live.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat(client, live):
    r = client.chat.completions.create(model=live.model, messages=MSGS, max_tokens=12, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(live.engine.encode(
        "<|user|>\nWrite a function that parses JSON.<|end|>\n<|assistant|>\n"))
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # max_completion_tokens is honoured too, and greedy decoding is deterministic
    r2 = client.chat.completions.create(model=live.model, messages=MSGS, max_completion_tokens=12, temperature=0)
    assert r2.choices[0].message.content == c.message.content


def test_chat_stream_with_usage(client, live):
    full = client.chat.completions.create(model=live.model, messages=MSGS, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model=live.model, messages=MSGS, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    final = chunks[-2].choices[0]
    assert final.finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == full.choices[0].message.content


def test_chat_logprobs(client, live):
    r = client.chat.completions.create(model=live.model, messages=MSGS, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert len(item.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert item.logprob == pytest.approx(max(t.logprob for t in item.top_logprobs), abs=1e-5)
        assert item.logprob <= 0


def test_completions_echo_logprobs(client, live):
    prompt = "import json\ndef load(path):"
    n_prompt = len(live.engine.encode(prompt))
    r = client.completions.create(model=live.model, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                  logprobs=2, extra_body={"ignore_eos": True})
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith(prompt)
    assert len(lp.tokens) == n_prompt + 3 == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:n_prompt]) == prompt
    assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    for tok, v, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[tok] == pytest.approx(v)  # the token itself is always among the top ones
    for v, top in zip(lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:]):
        assert v == pytest.approx(max(top.values()))  # greedy
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 3
    # prompt scoring agrees with the model run on the whole text at once
    import torch

    ids = live.engine.encode(prompt)
    with torch.no_grad():
        logits, _ = live.engine.model(torch.tensor([ids]))
    ref = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert lp.token_logprobs[1:n_prompt] == pytest.approx(ref.tolist(), abs=1e-4)

    # max_tokens 0 with echo: the prompt only, same numbers
    r0 = client.completions.create(model=live.model, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    assert r0.choices[0].text == prompt
    assert r0.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:n_prompt], abs=1e-4)


def test_completions_prompt_forms(client, live):
    ids = live.engine.encode("def f(x):")
    r = client.completions.create(model=live.model, prompt=[ids, ids[:2]], max_tokens=2, temperature=0,
                                  logprobs=1, echo=True, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert len(r.choices[0].logprobs.tokens) == len(ids) + 2
    assert len(r.choices[1].logprobs.tokens) == 4
    r = client.completions.create(model=live.model, prompt=["a", "b", "c"], max_tokens=1, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    r = client.completions.create(model=live.model, prompt=ids, max_tokens=1, temperature=0)
    assert len(r.choices) == 1


def _spanning_stop(client, live, prompt):
    """A greedy continuation and a stop string made of the end of one token and the start of the next."""
    r = client.completions.create(model=live.model, prompt=prompt, max_tokens=40, temperature=1, seed=7, logprobs=0,
                                  extra_body={"ignore_eos": True})
    text, toks = r.choices[0].text, r.choices[0].logprobs.tokens
    offsets = r.choices[0].logprobs.text_offset
    for i in range(2, len(toks) - 1):
        a, b = toks[i], toks[i + 1]
        if len(a) >= 2 and b and "\ufffd" not in a + b and text[offsets[i]:offsets[i] + len(a + b)] == a + b:
            stop = a[-2:] + b[0]
            pos = offsets[i] + len(a) - 2
            if text.find(stop) == pos and pos > 0:
                return text, stop, pos
    pytest.skip("no ascii token boundary in the greedy continuation")


def test_stop_spanning_tokens(client, live):
    prompt = "The json module"
    text, stop, pos = _spanning_stop(client, live, prompt)
    r = client.completions.create(model=live.model, prompt=prompt, max_tokens=40, temperature=1, seed=7,
                                  stop=[stop, "\x00"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == text[:pos]
    assert r.choices[0].finish_reason == "stop"
    # streaming: the same text, and no chunk ever carries a piece of the stop string past pos
    pieces = []
    for ch in client.completions.create(model=live.model, prompt=prompt, max_tokens=40, temperature=1, seed=7, stop=stop,
                                        stream=True, extra_body={"ignore_eos": True}):
        pieces.append(ch.choices[0].text)
        assert stop[0] not in "".join(pieces)[pos:]
    assert "".join(pieces) == text[:pos]
    # chat streaming too
    full = client.chat.completions.create(model=live.model, messages=MSGS, max_tokens=40, temperature=1, seed=3,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    stop2 = full[5:8]
    assert len(stop2) == 3
    cut = full.find(stop2)
    out = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=live.model, messages=MSGS, max_tokens=40, temperature=1, seed=3, stop=stop2, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert out == full[:cut]


def test_n_with_seed_is_reproducible(client, live):
    kw = dict(model=live.model, messages=MSGS, max_tokens=16, temperature=1.0, n=2, seed=1234,
              extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1]
    assert texts == [c.message.content for c in b.choices]
    assert texts[0] != texts[1]
    c = client.chat.completions.create(**{**kw, "seed": 99})
    assert [x.message.content for x in c.choices] != texts
    assert a.usage.completion_tokens == 32


def test_sampling_controls(client, live):
    base = dict(model=live.model, prompt="import", max_tokens=8, extra_body={"ignore_eos": True})
    greedy = client.completions.create(temperature=0, **base).choices[0].text
    top1 = client.completions.create(temperature=1.0, seed=5, **{**base, "extra_body": {"ignore_eos": True,
                                                                                        "top_k": 1}})
    assert top1.choices[0].text == greedy
    tiny_p = client.completions.create(temperature=1.0, seed=5, top_p=1e-6, **base)
    assert tiny_p.choices[0].text == greedy
    # logit_bias can force a token
    tok = live.engine.encode("json")[0]
    forced = client.completions.create(temperature=0, logit_bias={str(tok): 100}, **base).choices[0]
    assert forced.text == live.engine.decode([tok]) * 8
    # a strong presence penalty forbids repeating the forced token
    biased = client.completions.create(temperature=0, logit_bias={str(tok): 1.5}, **base)
    assert biased.choices[0].text.count("json") == 8
    pen = client.completions.create(temperature=0, logit_bias={str(tok): 1.5}, presence_penalty=2.0, **base)
    assert pen.choices[0].text.count("json") == 1
    freq = client.completions.create(temperature=0, logit_bias={str(tok): 1.5}, frequency_penalty=1.0, **base)
    assert freq.choices[0].text.count("json") == 2
    # min_p and repetition_penalty come through extra_body, as vLLM takes them (their effect on known logits:
    # tests/test_model.py). min_p 1 keeps only the top token: greedy, whatever the seed; each control keeps its seed's text
    for extra in ({"min_p": 1.0}, {"min_p": 0.05}, {"repetition_penalty": 1.3}, {"top_k": 5}):
        body = {**base, "extra_body": {"ignore_eos": True, **extra}}
        texts = [client.completions.create(temperature=1.0, seed=s, **body).choices[0].text for s in (3, 3, 4)]
        assert texts[0] == texts[1], extra
        if extra == {"min_p": 1.0}:
            assert texts[0] == texts[2] == greedy
    for field, value in (("min_p", 1.5), ("repetition_penalty", 0), ("top_k", -2)):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{**base, "extra_body": {field: value}})
        assert e.value.body["param"] == field or field in str(e.value.body), e.value.body


def test_response_format_json(client, live):
    pytest.importorskip("llguidance")
    # a random model's object may run past max_tokens (a string that never closes); every one that stops is
    # a JSON object, and most stop
    stopped = 0
    for seed in range(8):
        r = client.chat.completions.create(model=live.model, messages=MSGS, response_format={"type": "json_object"},
                                           max_tokens=60, temperature=0.7, seed=seed)
        if r.choices[0].finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(r.choices[0].message.content), dict)
        else:
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 60
    assert stopped >= 4
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "n"],
              "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer", "maximum": 99}}}
    for seed in range(2):
        r = client.chat.completions.create(
            model=live.model, messages=MSGS, max_tokens=60, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}})
        obj = json.loads(r.choices[0].message.content)
        assert set(obj) == {"name", "n"} and isinstance(obj["name"], str) and len(obj["name"]) <= 8
        assert isinstance(obj["n"], int) and obj["n"] <= 99
    # streamed, the deltas add up to the same valid JSON
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=live.model, messages=MSGS, max_tokens=60, temperature=1.0, seed=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}) if c.choices)
    assert set(json.loads(text)) == {"name", "n"}


def test_embeddings_base64_default(client, live):
    r = client.embeddings.create(model=live.model, input=["hello world", "import json"])
    assert [d.index for d in r.data] == [0, 1]
    v = np.array(r.data[0].embedding)
    assert v.shape == (live.engine.cfg.d_model,)
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-4)
    f = client.embeddings.create(model=live.model, input="hello world", encoding_format="float")
    assert np.allclose(f.data[0].embedding, v, atol=1e-6)
    raw = httpx.post(f"{live.base}/embeddings", json={"input": "hello world", "encoding_format": "base64"}).json()
    assert np.allclose(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4"), v, atol=1e-6)
    assert r.usage.prompt_tokens == len(live.engine.encode("hello world")) + len(live.engine.encode("import json"))


def test_context_overflow_is_400(client, live):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=live.model, messages=MSGS, max_tokens=live.engine.max_context)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=live.model, prompt="x " * 400, max_tokens=1)
    assert e.value.code == "context_length_exceeded"


def test_unsupported_and_invalid_parameters(client, live):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=live.model, messages=MSGS, functions=[{"name": "f", "parameters": {}}])
    assert e.value.param == "functions" and "functions" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=live.model, prompt="x", suffix="y")
    assert e.value.param == "suffix"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=live.model, messages=MSGS, top_logprobs=25, logprobs=True)
    assert e.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=live.model, messages=MSGS, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
    assert e.value.param == "response_format"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
    r = httpx.post(f"{live.base}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{live.base}/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(f"{live.base}/completions", content=b"x" * (9 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()


def test_api_key(random_model):
    engine, srv = start(random_model, api_key="s3cret", max_batch=2)
    try:
        bad = openai.OpenAI(base_url=srv.base, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.code == "invalid_api_key"
        for path in ("/v1/chat/completions", "/tokenize", "/metrics"):
            r = httpx.post(srv.root + path, json={}) if path != "/metrics" else httpx.get(srv.root + path)
            assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(f"{srv.root}/health").status_code == 200
        good = openai.OpenAI(base_url=srv.base, api_key="s3cret", max_retries=0)
        assert good.models.list().data
    finally:
        srv.stop()
        engine.close()


def test_tokenizer_routes(live):
    info = httpx.get(f"{live.root}/tokenizer_info").json()
    assert info["eos_token"] == "<|end|>" and info["bos_token"] is None and "chat_template" in info
    toks = httpx.post(f"{live.root}/tokenize", json={"prompt": "import json", "add_special_tokens": False}).json()
    assert toks["tokens"] == live.engine.encode("import json")
    back = httpx.post(f"{live.root}/detokenize", json={"tokens": toks["tokens"]}).json()
    assert back["prompt"] == "import json"


def test_openapi_and_health(live):
    schema = httpx.get(f"{live.root}/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/tokenize"):
        assert path in schema["paths"]
    assert httpx.get(f"{live.root}/health").json()["status"] == "ok"


def test_metrics_under_vllm_names_count_each_finished_choice(random_model):
    """vLLM's series, with its names and model_name label: one time-to-first-token per choice, one inter-token
    gap per token after the first, finished choices by reason, the tokens, and idle gauges at rest."""
    engine, srv = start(random_model, max_batch=4)
    try:
        with httpx.Client(timeout=60) as h:
            model = h.get(f"{srv.base}/models").json()["data"][0]["id"]
            r = h.post(f"{srv.base}/completions", json={"prompt": "import", "max_tokens": 5, "n": 2,
                                                         "ignore_eos": True, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 10
            with h.stream("POST", f"{srv.base}/chat/completions", json={
                    "messages": MSGS, "max_tokens": 3, "ignore_eos": True, "stream": True}) as stream:
                assert sse_events(stream.iter_lines())[-1] == "[DONE]"
        m = metrics_of(srv.root)
        lab = f'model_name="{model}"'
        assert m[f"vllm:time_to_first_token_seconds_count{{{lab}}}"] == 3
        assert m[f'vllm:time_to_first_token_seconds_bucket{{{lab},le="+Inf"}}'] == 3
        assert m[f"vllm:inter_token_latency_seconds_count{{{lab}}}"] == 2 * 4 + 2
        assert m[f"vllm:e2e_request_latency_seconds_count{{{lab}}}"] == 3
        assert m[f"vllm:e2e_request_latency_seconds_sum{{{lab}}}"] >= m[f"vllm:time_to_first_token_seconds_sum{{{lab}}}"]
        assert m[f"vllm:request_queue_time_seconds_count{{{lab}}}"] == 3
        assert m[f'vllm:request_success_total{{{lab},finished_reason="length"}}'] == 3
        assert m[f'vllm:request_success_total{{{lab},finished_reason="stop"}}'] == 0
        assert m[f"vllm:generation_tokens_total{{{lab}}}"] == 13
        assert m[f"vllm:prompt_tokens_total{{{lab}}}"] == m["glassforge_prompt_tokens_total"] > 0
        assert m[f"vllm:num_requests_running{{{lab}}}"] == 0 and m[f"vllm:num_requests_waiting{{{lab}}}"] == 0
        assert m[f"vllm:kv_cache_usage_perc{{{lab}}}"] == 0
    finally:
        srv.stop()
        engine.close()


def test_queue_full_is_429_and_disconnect_frees_slot(random_model):
    engine, srv = start(random_model, max_batch=4, max_queue=0)
    try:
        body = {"prompt": "import", "max_tokens": 200, "stream": True, "ignore_eos": True, "temperature": 0}
        with httpx.Client(timeout=30) as h:
            with h.stream("POST", f"{srv.base}/completions", json=body) as s:
                lines = s.iter_lines()
                next(line for line in lines if line.startswith("data:"))
                busy = h.post(f"{srv.base}/completions", json={"prompt": "x", "max_tokens": 1, "n": 4})
                assert busy.status_code == 429
                assert busy.headers["retry-after"] == "1"
                assert busy.json()["error"]["type"] == "rate_limit_error"
            # the stream is closed after one chunk: its slot must be freed long before 200 tokens
            wait_until(lambda: metrics_of(srv.root)["glassforge_running_sequences"] == 0, 5,
                       "disconnected stream still running")
            m = metrics_of(srv.root)
            assert m["glassforge_cancelled_total"] >= 1
            assert m["glassforge_generation_tokens_total"] < 200
            ok = h.post(f"{srv.base}/completions", json={"prompt": "x", "max_tokens": 1})
            assert ok.status_code == 200
            # a non-streaming client that gives up is noticed too: send by hand, wait until it runs, hang up
            import socket
            from urllib.parse import urlsplit

            payload = json.dumps({**body, "stream": False, "n": 4, "max_tokens": 250, "prompt": "x"}).encode()
            u = urlsplit(srv.base)
            sock = socket.create_connection((u.hostname, u.port))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            wait_until(lambda: metrics_of(srv.root)["glassforge_running_sequences"] == 4, 10,
                       "the request never ran", interval=0.005)
            sock.close()
            wait_until(lambda: metrics_of(srv.root)["glassforge_running_sequences"] == 0, 5,
                       "abandoned request still running", interval=0.05)
            m = metrics_of(srv.root)
            assert m["glassforge_cancelled_total"] >= 5 and m["glassforge_generation_tokens_total"] < 200 + 1000
    finally:
        srv.stop()
        engine.close()


def test_error_midstream_is_an_error_event(live, monkeypatch):
    """An engine failure after a stream has started reaches the client as an OpenAI error event, and the
    stream ends without [DONE], on completions and chat alike (one SSE generator); the server keeps serving."""
    def broken(tokens, positions, cache):
        raise RuntimeError("boom")

    monkeypatch.setattr(live.engine.fast, "decode", broken)  # the prefill's token goes out; the next step fails
    # log-probs make the prefill's token an event of its own, whatever its text
    for path, body in (("completions", {"prompt": "import", "logprobs": 0}),
                       ("chat/completions", {"messages": MSGS, "logprobs": True})):
        with httpx.stream("POST", f"{live.base}/{path}", timeout=60,
                          json={**body, "max_tokens": 8, "stream": True, "ignore_eos": True}) as r:
            assert r.status_code == 200  # the stream had started before the failure
            events = sse_events(r.iter_lines())
        assert "[DONE]" not in events
        *chunks, last = events
        assert chunks and all("choices" in c for c in chunks), events
        rid = r.headers["x-request-id"]
        assert last == {"error": {"message": f"internal server error (request id {rid}); the server's log has "
                                             "the details", "type": "server_error", "param": None, "code": None}}
        assert "boom" not in json.dumps(events)  # the exception's text stays in the log
    monkeypatch.undo()
    wait_until(lambda: live.engine.batch_size == 0, 10, "failed sequences still running")
    r = httpx.post(f"{live.base}/completions", json={"prompt": "import", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


class FakeLoop:
    """An event loop's call_soon_threadsafe that only records: the test runs the wake-ups itself."""

    def __init__(self):
        self.calls = []

    def call_soon_threadsafe(self, fn):
        self.calls.append(fn)

    def run_wakeups(self):
        while self.calls:
            self.calls.pop(0)()


def test_next_merged_folds_one_choices_waiting_events_up_to_its_finish():
    from glassforge.serve.serving import Delivery
    from glassforge.serve.types import Event, TokenLogprob

    def tok(i):
        return TokenLogprob(i, f"t{i}", -0.5, None, i)

    loop = FakeLoop()
    d = Delivery(loop, interval=0.0)
    for ev in (Event(0, "a", [tok(1)], prompt_tokens=4, completion_tokens=1),
               Event(0, "b", [tok(2)], prompt_tokens=4, completion_tokens=2),
               Event(0, "c", [tok(3)], "stop", prompt_tokens=4, completion_tokens=3),
               Event(0, "late"), Event(1, "other")):
        d.sink(ev)
    loop.run_wakeups()
    merged = asyncio.run(d.next_merged())
    assert (merged.text, [t.id for t in merged.tokens], merged.finish_reason) == ("abc", [1, 2, 3], "stop")
    assert (merged.prompt_tokens, merged.completion_tokens) == (4, 3)
    assert [e.text for e in d.ready] == ["late", "other"]  # nothing folded past the finish
    # another choice's event, or an error, is never folded in
    assert asyncio.run(d.next_merged()).text == "late" and len(d.ready) == 1
    d.sink(Event(1, error="boom"))
    loop.run_wakeups()
    assert asyncio.run(d.next_merged()).text == "other" and len(d.ready) == 1
    assert asyncio.run(d.next_merged()).error == "boom"


def test_stream_interval_wakes_the_loop_for_first_and_last_events_and_holds_the_rest():
    """Delivery.sink: the first event and a finish wake the event loop at once; events between wait for the
    interval (and for an earlier wake-up to be delivered)."""
    from glassforge.serve.serving import Delivery
    from glassforge.serve.types import Event

    loop = FakeLoop()
    d = Delivery(loop, interval=1000.0)
    d.sink(Event(0, "a"))
    assert len(loop.calls) == 1  # the first event: at once
    loop.run_wakeups()
    d.sink(Event(0, "b"))
    d.sink(Event(0, "c"))
    assert loop.calls == [] and len(d.ready) == 1  # held: the interval has not passed
    d.sink(Event(0, "d", finish_reason="stop"))
    assert len(loop.calls) == 1  # the last: at once, taking the held ones along
    loop.run_wakeups()
    assert [e.text for e in d.ready] == ["a", "b", "c", "d"]

    d = Delivery(loop, interval=0.0)
    for text in "xyz":
        d.sink(Event(0, text))
        loop.run_wakeups()
    assert len(d.ready) == 3


def test_stream_interval_folds_a_streams_tokens(live):
    """With a long interval, the tokens after the first arrive together, and the text is unchanged."""
    from glassforge.serve.app import create_app

    srv = LiveServer(create_app(live.engine, stream_interval_ms=1000))
    try:
        body = {"prompt": "import", "max_tokens": 24, "ignore_eos": True, "temperature": 0, "logprobs": 0}
        counts, text = [], ""
        start = time.monotonic()
        with httpx.stream("POST", f"{srv.base}/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    if choice["logprobs"] and choice["logprobs"]["tokens"]:
                        counts.append(len(choice["logprobs"]["tokens"]))
        elapsed = time.monotonic() - start
        assert sum(counts) == 24
        # the first wake-up's tokens, then one chunk per second at most, then the last event's
        assert len(counts) <= 2 + int(elapsed) + 1, (counts, elapsed)
        assert text == httpx.post(f"{srv.base}/completions", json=body, timeout=60).json()["choices"][0]["text"]
    finally:
        srv.stop()


def test_concurrent_streams_load(live):
    """32 concurrent streaming clients x 20 requests: no errors, and nothing left running or queued."""
    n_clients, per_client = 32, 20

    async def one_client(i, ac):
        for j in range(per_client):
            text, done, finish = "", False, None
            async with ac.stream("POST", f"{live.base}/chat/completions", json={
                    "messages": [{"role": "user", "content": f"client {i} request {j}"}], "max_tokens": 4,
                    "temperature": 0.8, "seed": j, "stream": True, "stream_options": {"include_usage": True}}) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    obj = json.loads(data)
                    assert "error" not in obj, obj
                    for c in obj["choices"]:
                        text += c["delta"].get("content") or ""
                        finish = c["finish_reason"] or finish
            assert done and finish in ("stop", "length")

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=120, limits=limits) as ac:
            await asyncio.gather(*(one_client(i, ac) for i in range(n_clients)))

    before = metrics_of(live.root)
    asyncio.run(main())
    m = metrics_of(live.root)
    assert m["glassforge_running_sequences"] == 0 and m["glassforge_queue_depth"] == 0
    key = 'glassforge_requests_total{route="/v1/chat/completions",status="200"}'
    assert m[key] - before.get(key, 0) == n_clients * per_client
    assert not any(k.startswith("glassforge_requests_total") and 'status="5' in k for k in m)
    assert m["glassforge_decode_steps_total"] > 0


def test_terminal_chat(random_model, monkeypatch):
    import io

    from glassforge.serve import chat as chat_mod

    seen = []
    real_reply = chat_mod.reply

    def recording_reply(engine, messages, temperature, max_tokens, out, **kw):
        seen.append([dict(m) for m in messages])
        return real_reply(engine, messages, temperature, max_tokens, out, **kw)

    monkeypatch.setattr(chat_mod, "reply", recording_reply)
    monkeypatch.setenv("GLASSFORGE_DECODE_COMPILE", "0")  # chat() makes its own engine
    out = io.StringIO()
    chat_mod.chat(random_model, temperature=0, max_tokens=5,
                  stdin=io.StringIO("hello\nmore\n/reset\nagain\n/exit\nnot read\n"), stdout=out)
    assert [[m["content"] for m in msgs if m["role"] == "user"] for msgs in seen] == [
        ["hello"], ["hello", "more"], ["again"]]
    assert seen[1][1]["role"] == "assistant"  # the first reply is part of the conversation
    assert out.getvalue().count("\n") >= 3


def test_trace(client, live, tmp_path):
    from glassforge.release.trace import Tracer

    # the random model's release has no trace index: one OpenAI-shaped 400, wherever tracing is asked for
    r = httpx.post(f"{live.base}/trace", json={"text": "import json"})
    assert r.status_code == 400
    no_index = r.json()["error"]
    assert no_index["code"] == "trace_unavailable" and no_index["type"] == "invalid_request_error"
    for path, body in (("completions", {"prompt": "x"}), ("chat/completions", {"messages": MSGS})):
        for stream in (False, True):
            r = httpx.post(f"{live.base}/{path}", json={**body, "max_tokens": 1, "trace": True, "stream": stream})
            assert r.status_code == 400 and r.json()["error"] == {**no_index, "param": "trace"}
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=live.model, prompt="x", max_tokens=1, extra_body={"trace": True})

    # a copy of the release with an index over a few documents
    import shutil

    from glassforge.core.runfolder import Release
    from glassforge.data import pystdlib

    folder = tmp_path / "release"
    shutil.copytree(live.engine.folder, folder, ignore=shutil.ignore_patterns("trace"))
    texts = [d.text for d in pystdlib.iter_documents(["json"])][:5]
    add_trace_index(folder, live.engine, texts)
    engine, srv = start(folder, max_batch=2)
    try:
        quote = texts[0][:200]
        got = httpx.post(f"{srv.base}/trace", json={"text": quote, "min_tokens": 4}).json()
        want = Tracer(Release(folder).trace).trace(quote, min_tokens=4)
        got.pop("elapsed_ms", None)
        want.pop("elapsed_ms", None)
        assert got == json.loads(json.dumps(want))
        assert json.dumps(got).count("doc0") >= 1
        c = openai.OpenAI(base_url=srv.base, api_key="k", max_retries=0)
        name = c.models.list().data[0].id
        assert name == tmp_path.name  # a release/ folder is named after its run folder
        r = c.completions.create(model=name, prompt=quote, max_tokens=4, extra_body={"trace": True})
        assert "trace" in r.choices[0].model_extra
        chunks = list(c.chat.completions.create(model=name, messages=MSGS, max_tokens=4, stream=True,
                                                extra_body={"trace": True}))
        assert "trace" in chunks[-1].choices[0].model_extra and chunks[-1].choices[0].finish_reason
    finally:
        srv.stop()
        engine.close()


def test_one_sampler_everywhere(client, live, random_model):
    """`glassforge generate`, the terminal chat and the server give the same text for the same prompt,
    settings and seed: one tokenizer, one decode path, one sampler."""
    import io

    from glassforge.serve.chat import reply
    from glassforge.serve.engine import Engine
    from glassforge.serve.generate import generate
    from glassforge.tokenizer.bpe import render_chat

    settings = {"temperature": 0.8, "top_p": 0.9, "seed": 7}
    question = MSGS[0]["content"]

    def completion(prompt: str) -> str:
        return client.completions.create(model=live.model, prompt=prompt, max_tokens=24, **settings).choices[0].text

    plain = generate(random_model, "import json\n", max_tokens=24, **settings)
    assert plain and plain == completion("import json\n")
    assert generate(random_model, "import json\n", max_tokens=24, **{**settings, "seed": 8}) != plain  # it samples

    as_chat = generate(random_model, question, max_tokens=24, chat=True, **settings)
    engine = Engine(random_model, max_batch=1, compile_decode=False)  # as `glassforge chat` makes it
    try:
        out = io.StringIO()
        said = reply(engine, [{"role": "user", "content": question}], settings["temperature"], 24, out,
                     top_p=settings["top_p"], seed=settings["seed"])
    finally:
        engine.close()
    served = client.chat.completions.create(model=live.model, messages=MSGS, max_tokens=24, **settings)
    rendered = render_chat(MSGS, True, live.engine.chat_template)
    assert as_chat and as_chat == said == out.getvalue() == completion(rendered) == served.choices[0].message.content


@pytest.mark.slow
def test_lm_eval_local_completions(live, tmp_path):
    """lm-evaluation-harness local-completions: a multiple-choice and a generate_until task, offline."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from lm_eval_server import run_lm_eval

    res = run_lm_eval(live.root, live.model, live.engine.max_context, live.engine, tmp_path)
    assert res["problems"] == []
    assert res["n_samples"] == {"gf_mc": 6, "gf_gen": 4}
    assert 0 <= res["results"]["gf_mc"]["acc,none"] <= 1


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(live):
    """Property-based requests generated from /openapi.json never get a 5xx."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(exe).exists():
        pytest.skip("schemathesis is not installed")
    r = subprocess.run([exe, "run", f"{live.root}/openapi.json", "--checks", "not_a_server_error",
                        "--max-examples", "25", "--phases", "coverage,fuzzing", "--seed", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]


# ------------------------------------------------------------------------------------------ /v1/responses


def test_responses_create_is_the_chat_completion_of_the_same_messages(client, live):
    chat = client.chat.completions.create(model=live.model, messages=[
        {"role": "system", "content": "Answer briefly."}, *MSGS], max_tokens=8, temperature=0)
    r = client.responses.create(model=live.model, instructions="Answer briefly.", input=MSGS[0]["content"],
                                max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.output[0].type == "message"
    assert r.output_text == chat.choices[0].message.content
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.store is False
    as_messages = client.responses.create(model=live.model, input=[
        {"role": "system", "content": "Answer briefly."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": MSGS[0]["content"]}]}],
        max_output_tokens=8, temperature=0)
    assert as_messages.output_text == r.output_text
    seeded = [client.responses.create(model=live.model, input="import", max_output_tokens=6, temperature=1.0,
                                      extra_body={"seed": 11}).output_text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_responses_stream_events_add_up_to_the_response(client, live):
    whole = client.responses.create(model=live.model, input="hello", max_output_tokens=6, temperature=0)
    with client.responses.stream(model=live.model, input="hello", max_output_tokens=6, temperature=0) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-4].text == whole.output_text
    assert events[-1].response.output[0].content[0].text == whole.output_text


def test_responses_json_schema_completes_and_parses(client, live):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "additionalProperties": False, "required": ["n"],
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    fmt = {"format": {"type": "json_schema", "name": "digit", "schema": schema, "strict": True}}
    with client.responses.stream(model=live.model, input="a digit", text=fmt, temperature=1.0,
                                 extra_body={"seed": 3}) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and json.loads(final.output_text)["n"] in range(10)
    r = client.responses.create(model=live.model, input="a digit", text=fmt, temperature=1.0, extra_body={"seed": 3})
    assert r.output_text == final.output_text


def test_responses_refuses_what_needs_stored_state(client, live):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=live.model, input="hi", previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id" and "stateless" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=live.model, input="hi", max_output_tokens=0)
    assert "max_output_tokens" in str(e.value.body)
