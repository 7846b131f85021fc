"""The server against OpenAI's own OpenAPI document, cut to the routes we serve (tests/openapi/: the subset,
the script that cut it and the commit of https://github.com/openai/openai-openapi it came from).

schemathesis generates requests from the document (its examples, its boundary values, then random ones):
none may get a 5xx, and every answer must match the document's schema for its status. Streams, which
schemathesis does not read, are checked here chunk by chunk against the document's chunk and event schemas.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from helpers import engine_server, make_random_model_folder

OPENAPI = Path(__file__).parent / "openapi"
SUBSET = OPENAPI / "openai-subset.json"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with engine_server(make_random_model_folder(tmp_path_factory.mktemp("openapi_model"), max_seq_len=1024),
                       max_batch=8) as srv:
        yield srv


def test_the_subset_is_openais_document_cut_to_our_routes():
    doc = json.loads(SUBSET.read_text())
    assert doc["info"]["x-source"].startswith("https://github.com/openai/openai-openapi/blob/")
    assert {p: sorted(m) for p, m in doc["paths"].items()} == {
        "/chat/completions": ["post"], "/completions": ["post"], "/embeddings": ["post"], "/models": ["get"],
        "/models/{model}": ["get"], "/responses": ["post"]}
    refs = set(re.findall(r'"\$ref": "([^"]+)"', SUBSET.read_text()))
    assert len(refs) > 100
    for ref in refs:  # every reference resolves inside the subset
        kind, name = ref.removeprefix("#/components/").split("/", 1)
        assert name in doc["components"][kind], ref


@pytest.mark.slow
def test_schemathesis_with_openais_document_finds_no_5xx_and_no_answer_off_the_schema(live):
    exe = Path(sys.executable).parent / "schemathesis"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "hooks", "PYTHONPATH": str(OPENAPI),
           "GLASSFORGE_TEST_MODEL": live.model}
    r = subprocess.run([str(exe), "run", str(SUBSET), "--url", live.base,
                        "--checks", "not_a_server_error,response_schema_conformance",
                        "--phases", "examples,coverage,fuzzing", "--max-examples", "30", "--seed", "1"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "6 selected" in r.stdout and " generated" in r.stdout


def nullable_as_json_schema(node):
    """The document is OpenAPI 3.1 but still marks some values with 3.0's `nullable`: read it as JSON Schema."""
    if isinstance(node, dict):
        for value in node.values():
            nullable_as_json_schema(value)
        if node.get("nullable") is True:
            if isinstance(node.get("type"), str):
                node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = node["enum"] + [None]
            inner = {k: node.pop(k) for k in ("$ref", "allOf", "anyOf", "oneOf") if k in node}
            if inner:
                node["anyOf"] = [inner, {"type": "null"}]
    elif isinstance(node, list):
        for value in node:
            nullable_as_json_schema(value)
    return node


def test_streamed_chunks_and_events_match_the_documents_schemas(live):
    from jsonschema import Draft202012Validator

    doc = nullable_as_json_schema(json.loads(SUBSET.read_text()))
    schemas = doc["components"]["schemas"]

    def errors(name: str, value) -> list[str]:
        validator = Draft202012Validator({**doc, "$ref": f"#/components/schemas/{name}"})
        return [f"{name} {list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(value)]

    def events(path: str, body: dict) -> list[dict]:
        with httpx.stream("POST", f"{live.base}{path}", json=body, timeout=120) as r:
            assert r.status_code == 200
            return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]

    tool = {"type": "function", "function": {"name": "get_time", "strict": True, "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}}
    found: list[str] = []
    for body in ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": True,
                  "top_logprobs": 2, "stream_options": {"include_usage": True}},
                 {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 80, "tools": [tool],
                  "tool_choice": "required"}):
        chunks = events("/chat/completions", {**body, "stream": True})
        assert len(chunks) > 2
        for chunk in chunks:
            found += errors("CreateChatCompletionStreamResponse", chunk)
    by_type = {schemas[s["$ref"].rsplit("/", 1)[1]]["properties"]["type"]["enum"][0]: s["$ref"].rsplit("/", 1)[1]
               for s in schemas["ResponseStreamEvent"]["anyOf"]}
    flat = {"type": "function", **tool["function"]}
    for body in ({"input": "hi", "max_output_tokens": 4}, {"input": "hi", "max_output_tokens": 80, "tools": [flat],
                                                           "tool_choice": "required"}):
        seen = events("/responses", {**body, "stream": True})
        assert seen[-1]["type"] in ("response.completed", "response.incomplete")
        for event in seen:
            found += errors(by_type[event["type"]], event)
    for path, name, body in (("/responses", "Response", {"input": "hi", "max_output_tokens": 4, "user": "u"}),
                             ("/completions", "CreateCompletionResponse", {"prompt": "hi", "max_tokens": 3,
                                                                           "logprobs": 2})):
        found += errors(name, httpx.post(f"{live.base}{path}", json=body, timeout=60).json())
    assert found == []
