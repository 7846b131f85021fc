"""Tool calling through the official openai client: the OpenAI shapes, whole and streamed, constrained
arguments, tool results in the conversation, and the 400s. The model is random: what `auto` reads out of a
reply is tested on written replies (the parser), what the server sends on the model's own."""

from __future__ import annotations

import json
import random

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import engine_server, make_random_model_folder, sse_events

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon", "Oslo"]},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "strict": True,
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False}}}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    # the tools' preamble is some 500 tokens of the 512-token vocabulary: a longer context than random_model's
    with engine_server(make_random_model_folder(tmp_path_factory.mktemp("tools_model"), max_seq_len=1024),
                       max_batch=8) as srv:
        yield srv


@pytest.fixture()
def client(live):
    return openai.OpenAI(base_url=live.base, api_key="anything", max_retries=0, timeout=120)


def check_call(call, names=("get_weather", "get_time")) -> dict:
    assert call.id.startswith("call_") and call.type == "function" and call.function.name in names
    assert isinstance(call.function.arguments, str)  # JSON text, never an object
    args = json.loads(call.function.arguments)
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
    assert set(args) == set(schema["required"])
    assert all(args[k] in schema["properties"][k]["enum"] for k in args)
    return args


def test_required_tool_call_whole_and_streamed(client, live):
    kw = dict(model=live.model, messages=MSGS, tools=[WEATHER, TIME], tool_choice="required",
              parallel_tool_calls=False, temperature=1.0, seed=7, max_tokens=200)
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    args = check_call(choice.message.tool_calls[0])

    # the openai client's strict stream helper: its accumulated completion and its argument events
    with client.chat.completions.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls"
    call = streamed.message.tool_calls[0]
    assert call.function.name == choice.message.tool_calls[0].function.name
    assert call.function.arguments == choice.message.tool_calls[0].function.arguments
    assert call.function.parsed_arguments == args
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert len(done) == 1 and done[0].parsed_arguments == args and done[0].index == 0


def test_stream_deltas_carry_index_and_the_first_its_id_type_and_name(live):
    body = {"messages": MSGS, "tools": [WEATHER, TIME], "tool_choice": "required", "temperature": 1.0,
            "seed": 3, "max_tokens": 300, "stream": True, "parallel_tool_calls": True}
    with httpx.stream("POST", f"{live.base}/chat/completions", json=body, timeout=120) as resp:
        chunks = [e for e in sse_events(resp.iter_lines()) if e != "[DONE]"]
    deltas = [d for c in chunks for ch in c["choices"] for d in ch["delta"].get("tool_calls") or []]
    assert deltas
    seen: dict[int, dict] = {}
    for d in deltas:
        assert isinstance(d["index"], int)
        if d["index"] not in seen:  # a call's first delta names it
            assert d["id"].startswith("call_") and d["type"] == "function" and d["function"]["arguments"] == ""
            seen[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
            assert isinstance(d["function"]["arguments"], str)
            seen[d["index"]]["arguments"] += d["function"]["arguments"]
    assert sorted(seen) == list(range(len(seen)))
    finish = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    whole = httpx.post(f"{live.base}/chat/completions", json={**body, "stream": False}, timeout=120).json()
    calls = whole["choices"][0]["message"].get("tool_calls") or []
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [(seen[i]["name"], seen[i]["arguments"]) for i in sorted(seen)]
    assert finish == [whole["choices"][0]["finish_reason"]]
    if finish == ["tool_calls"]:  # every call complete: each one's arguments are the schema's
        for c in calls:
            json.loads(c["function"]["arguments"])


def test_named_function_is_the_one_called(client, live):
    for name in ("get_time", "get_weather"):
        r = client.chat.completions.create(model=live.model, messages=MSGS, tools=[WEATHER, TIME], max_tokens=200,
                                           tool_choice={"type": "function", "function": {"name": name}})
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1 and calls[0].function.name == name
        check_call(calls[0])


def test_auto_and_none_render_the_tools_and_answer_in_text(client, live):
    from glassforge.tokenizer.bpe import render_chat

    for choice in ("auto", "none", None):
        kw = {"tool_choice": choice} if choice else {}
        r = client.chat.completions.create(model=live.model, messages=MSGS, tools=[WEATHER], max_tokens=8,
                                           temperature=0, **kw)
        want = render_chat(MSGS, True, live.engine.chat_template, [WEATHER])
        assert r.usage.prompt_tokens == len(live.engine.encode(want))
        assert isinstance(r.choices[0].message.content, str) and not r.choices[0].message.tool_calls
    plain = client.chat.completions.create(model=live.model, messages=MSGS, max_tokens=8, temperature=0)
    assert plain.usage.prompt_tokens < r.usage.prompt_tokens


def test_tool_results_in_the_conversation_render_as_transformers_renders_them(client, live):
    from transformers import AutoTokenizer

    turn = [{"role": "user", "content": "Weather in Paris and Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18"},
            {"role": "tool", "tool_call_id": "call_2", "content": "4"}]
    r = client.chat.completions.create(model=live.model, messages=turn, tools=[WEATHER], max_tokens=4,
                                       temperature=0)
    hf = AutoTokenizer.from_pretrained(str(live.engine.folder))
    ids = hf.apply_chat_template(turn, tools=[WEATHER], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert r.usage.prompt_tokens == len(ids)
    text = hf.apply_chat_template(turn, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>' in text
    assert "<|user|>\n<tool_response>\n18\n</tool_response><|end|>" in text


def test_a_seed_reproduces_the_call(client, live):
    kw = dict(model=live.model, messages=MSGS, tools=[WEATHER, TIME], tool_choice="required",
              parallel_tool_calls=False, temperature=1.0, max_tokens=200)
    got = {(c.function.name, c.function.arguments) for s in (11, 11)
           for c in client.chat.completions.create(seed=s, **kw).choices[0].message.tool_calls}
    assert len(got) == 1


@pytest.mark.parametrize("body, param, words", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice", "not among the given tools"),
    ({"tool_choice": "required"}, "tool_choice", "no 'tools'"),
    ({"tools": [WEATHER, {"type": "function", "function": {
        "name": "bad", "parameters": {"type": "object", "properties": {"a": {"type": "strng"}}}}}],
      "tool_choice": "required"}, "tools.1.function.parameters", "strng"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1", "twice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name", ""),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice", "response_format"),
])
def test_bad_tool_requests_are_400s_naming_the_field(live, body, param, words):
    r = httpx.post(f"{live.base}/chat/completions", json={"messages": MSGS, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def flat(tool: dict) -> dict:
    """A chat tool as the Responses API describes it."""
    return {"type": "function", **tool["function"]}


def test_responses_function_calls_whole_and_streamed(client, live):
    kw = dict(model=live.model, input="What is the weather in Paris?", tools=[flat(WEATHER), flat(TIME)],
              tool_choice="required", parallel_tool_calls=False, temperature=1.0, max_output_tokens=200,
              extra_body={"seed": 5})
    r = client.responses.create(**kw)
    assert r.status == "completed" and len(r.output) == 1
    call = r.output[0]
    assert call.type == "function_call" and call.call_id.startswith("call_") and call.status == "completed"
    args = json.loads(call.arguments)
    assert call.name in ("get_weather", "get_time") and isinstance(args, dict)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [(o.type, o.name, o.arguments) for o in final.output] == [("function_call", call.name, call.arguments)]
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == call.arguments
    named = client.responses.create(**{**kw, "tool_choice": {"type": "function", "name": "get_time"}})
    assert [o.name for o in named.output] == ["get_time"]


def test_responses_takes_calls_and_their_outputs_back_as_chat_does(client, live):
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather",
            "arguments": '{"city": "Paris", "unit": "C"}'}
    r = client.responses.create(model=live.model, tools=[flat(WEATHER)], max_output_tokens=6, temperature=0,
                                input=[{"role": "user", "content": "Weather in Paris?"}, call,
                                       {"type": "function_call_output", "call_id": "call_1", "output": "18"}])
    chat = client.chat.completions.create(
        model=live.model, tools=[WEATHER], max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": call["arguments"]}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "18"}])
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.output_text == (chat.choices[0].message.content or "")


def test_responses_bad_tools_are_400s(live):
    for body, param in [({"tools": [flat(WEATHER)], "tool_choice": {"type": "function", "name": "nope"}},
                         "tool_choice"),
                        ({"tools": [{"type": "function", "name": "bad", "parameters": {"type": "strng"}}],
                          "tool_choice": "required"}, "tools.0.parameters")]:
        r = httpx.post(f"{live.base}/responses", json={"input": "hi", **body}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# --- reading calls out of a reply ------------------------------------------------------------

REPLIES = [
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "x": {"a": "}"}}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    "plain text with <tool no call, and } braces }",
    '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "U',
    '<tool_call>\n{"nam',
    '<tool_call>\n{ "name" : "get_time" ,  "arguments":  {"zone": "UTC"} }\n</tool_call>\n\n',
]


def test_calls_read_from_whole_replies():
    from glassforge.serve.tools import parse_calls

    got = [parse_calls(r, {"get_weather", "get_time"}) for r in REPLIES]
    assert [(c, [(x.name, x.arguments) for x in calls]) for c, calls in got] == [
        ("Let me look.\n", [("get_weather", '{"city": "Paris", "x": {"a": "}"}}'), ("get_time", "{}")]),
        ("plain text with <tool no call, and } braces }", []),
        ('<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>', []),
        ("", [("get_time", '{"zone": "U')]),
        ('<tool_call>\n{"nam', []),
        ("", [("get_time", '{"zone": "UTC"}')]),
    ]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(REPLIES), st.randoms(use_true_random=False))
def test_a_reply_streamed_in_any_pieces_reads_as_the_whole(reply, rnd: random.Random):
    from glassforge.serve.tools import CallParser, parse_calls

    content, calls = parse_calls(reply, {"get_weather", "get_time"})
    cuts = sorted(rnd.sample(range(1, len(reply)), min(len(reply) - 1, rnd.randint(0, 12))))
    parser = CallParser({"get_weather", "get_time"})
    pieces = [parser.feed(reply[a:b]) for a, b in zip([0] + cuts, cuts + [len(reply)])] + [parser.finish()]
    assert "".join(p.content for p in pieces) == content
    arguments: dict[int, str] = {}
    for d in (d for p in pieces for d in p.deltas):
        if "id" in d:
            assert d["index"] == len(arguments) and d["function"] == {"name": calls[d["index"]].name, "arguments": ""}
            arguments[d["index"]] = ""
        else:
            arguments[d["index"]] += d["function"]["arguments"]
    assert [arguments[i] for i in sorted(arguments)] == [c.arguments for c in calls]
