"""`POST /v1/responses`: OpenAI's Responses API, stateless, over the same engine as chat completions.

What it takes: `input` as a text or as messages (text content, and earlier
function calls with their outputs), `instructions` (a system message before
them), `max_output_tokens`, `temperature`, `top_p`, `text.format` (text, a
JSON object, or a JSON schema, constrained through llguidance as chat's
`response_format` is), `tools` with `tool_choice` and `parallel_tool_calls`
(function tools, read and constrained as in chat: tools.py), `stream`, and
`seed` as an extension. The prompt is the chat template's rendering of those messages, so
a response and a chat completion of the same messages and settings are the
same text (tested).

Stateless, as Ollama's and llama-server's: nothing is stored, so
`previous_response_id` (which needs the stored earlier turns) is an
OpenAI-shaped 400 that says to send the earlier turns in `input`, and the
answer says `store: false`.

A stream is the event sequence the openai client's `responses.stream` reads:
`response.created`, `response.in_progress`, then for each output item in turn
(a message when there is text, a `function_call` per call)
`response.output_item.added`; for a message `response.content_part.added`,
one `response.output_text.delta` per piece of text, `response.output_text.done`,
`response.content_part.done`; for a call `response.function_call_arguments.delta`
per piece and `.done`; `response.output_item.done`; then `response.completed`
(or, when `max_output_tokens` cut it, `response.incomplete` with the reason),
each with its `sequence_number`.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from glassforge.core.errors import UserError
from glassforge.serve.protocol import (
    APIError,
    CalledFunction,
    ChatMessage,
    FunctionCallItem,
    FunctionCallOutput,
    NamedFunction,
    ResponsesRequest,
    SamplingFields,
    TextPart,
    ToolCall,
)
from glassforge.serve.serving import SSE_HEADERS, Server, json_answer, message_texts, render_messages, server_of, sse
from glassforge.serve.tools import CallParser, Piece, ToolUse, compile_tool_grammar, tool_use

router = APIRouter()


def _messages(req: ResponsesRequest) -> list[ChatMessage]:
    """The input as chat messages: function calls join the assistant turn before them, outputs are tool turns."""
    messages = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    if isinstance(req.input, str):
        return messages + [ChatMessage(role="user", content=req.input)]
    for m in req.input:
        if isinstance(m, FunctionCallItem):
            call = ToolCall(id=m.call_id, function=CalledFunction(name=m.name, arguments=m.arguments))
            if not (messages and messages[-1].role == "assistant"):
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[]))
            messages[-1].tool_calls = (messages[-1].tool_calls or []) + [call]
        elif isinstance(m, FunctionCallOutput):
            messages.append(ChatMessage(role="tool", content=m.output, tool_call_id=m.call_id))
        else:
            content = m.content if isinstance(m.content, str) else \
                [TextPart(type="text", text=p.text) for p in m.content]
            messages.append(ChatMessage(role=m.role, content=content))
    if not messages:
        raise APIError(400, "'input' holds no message", param="input")
    return messages


async def _grammar(server: Server, req: ResponsesRequest, use: ToolUse | None) -> str | None:
    fmt = req.text.format if req.text else None
    if use is not None and use.constrained:
        if fmt is not None and fmt.type != "text":
            raise APIError(400, "'text.format' cannot be combined with a 'tool_choice' that requires a tool call",
                           param="tool_choice")
        return await server.work.run(lambda: compile_tool_grammar(server.engine.grammars, use, "tools.{i}.parameters"))
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema" and not isinstance(fmt.json_schema, dict):
        raise APIError(400, "text.format json_schema needs {'type': 'json_schema', 'name': ..., 'schema': {...}}",
                       param="text.format")
    try:
        return await server.work.run(lambda: server.engine.grammars.json_grammar(
            fmt.json_schema if fmt.type == "json_schema" else None))
    except UserError as e:
        raise APIError(400, f"text.format: {e}", param="text.format") from None


def _tool_use(req: ResponsesRequest) -> ToolUse | None:
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice.name if isinstance(req.tool_choice, NamedFunction) else req.tool_choice
    rendered = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in tools]
    return tool_use(tools, choice, req.parallel_tool_calls, rendered=rendered)


def _message_item(item_id: str, text: str | None, status: str) -> dict:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def _usage(prompt_tokens: int, output_tokens: int, cached_tokens: int, written: bool) -> dict:
    """written: the prefix cache keeps the prompt (what it did not serve, it now holds)."""
    details = {"cached_tokens": cached_tokens, "cache_write_tokens": prompt_tokens - cached_tokens if written else 0}
    return {"input_tokens": prompt_tokens, "input_tokens_details": details,
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


class _Response:
    """The response at each point of its life (created, in progress, completed or incomplete), and its output
    items as the reply's text makes them: a message for text, a function_call for each call."""

    def __init__(self, server: Server, req: ResponsesRequest, use: ToolUse | None):
        self.id = f"resp_{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.server, self.req, self.use = server, req, use
        self.parser = CallParser(use.parsed) if use is not None and use.parsed is not None else None
        self.items: list[dict] = []  # output items, the last one open while the reply streams
        self.text = ""

    def body(self, status: str, output: list[dict], usage: dict | None, incomplete: bool = False) -> dict:
        req = self.req
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format \
            else {"type": "text"}
        choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedFunction) else \
            (req.tool_choice or ("auto" if req.tools else "none"))
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": None, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
                "model": self.server.model_name, "output": output,
                "parallel_tool_calls": bool(req.tools) and req.parallel_tool_calls is not False,
                "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
                "temperature": 1.0 if req.temperature is None else req.temperature,
                "text": {"format": fmt}, "tool_choice": choice,
                "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
                "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled",
                "metadata": req.metadata or {}, **({"usage": usage} if usage is not None else {}),
                **({"user": req.user} if req.user is not None else {})}  # the schema has neither as null

    def read(self, text: str, last: bool) -> list[tuple[str, dict]]:
        """The stream events (kind, fields) that text adds to the output items; last: the reply has ended."""
        piece = Piece(content=text) if self.parser is None else self.parser.feed(text)
        events = self._apply(piece)
        if last:
            if self.parser is not None:
                events += self._apply(self.parser.finish())
            if not self.items:  # an empty reply is an empty message
                events += self._open_message()
            events += self._close()
        return events

    def _apply(self, piece: Piece) -> list[tuple[str, dict]]:
        events: list[tuple[str, dict]] = []
        if piece.content:
            if not self.items or self.items[-1]["type"] != "message":
                events += self._open_message()
            self.text += piece.content
            events.append(("response.output_text.delta", {**self._where(), "delta": piece.content, "logprobs": []}))
        for d in piece.deltas:
            if "id" in d:
                events += self._close()
                item = _call_item(f"fc_{secrets.token_hex(12)}", d["id"], d["function"]["name"], "", "in_progress")
                self.items.append(item)
                events.append(("response.output_item.added", {"output_index": len(self.items) - 1, "item": item}))
            elif d["function"]["arguments"]:
                self.items[-1]["arguments"] += d["function"]["arguments"]
                events.append(("response.function_call_arguments.delta",
                               {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1,
                                "delta": d["function"]["arguments"]}))
        return events

    def _open_message(self) -> list[tuple[str, dict]]:
        events = self._close()
        item = _message_item(f"msg_{secrets.token_hex(12)}", None, "in_progress")
        self.items.append(item)
        self.text = ""
        return events + [("response.output_item.added", {"output_index": len(self.items) - 1, "item": item}),
                         ("response.content_part.added", {**self._where(), "part": self._part("")})]

    def _where(self) -> dict:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1, "content_index": 0}

    @staticmethod
    def _part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _close(self) -> list[tuple[str, dict]]:
        """The events that complete the open item, if any."""
        if not self.items or self.items[-1]["status"] != "in_progress":
            return []
        item, index = self.items[-1], len(self.items) - 1
        item["status"] = "completed"
        if item["type"] == "message":
            item["content"] = [self._part(self.text)]
            events = [("response.output_text.done", {**self._where(), "text": self.text, "logprobs": []}),
                      ("response.content_part.done", {**self._where(), "part": item["content"][0]})]
        else:
            events = [("response.function_call_arguments.done", {"item_id": item["id"], "output_index": index,
                                                                 "name": item["name"],
                                                                 "arguments": item["arguments"]})]
        return events + [("response.output_item.done", {"output_index": index, "item": json.loads(json.dumps(item))})]

    def final(self, finish_reason: str | None, prompt_tokens: int, output_tokens: int, cached_tokens: int) -> dict:
        incomplete = finish_reason == "length"
        status = "incomplete" if incomplete else "completed"
        items = json.loads(json.dumps(self.items))
        if incomplete:
            for item in items:
                item["status"] = "incomplete"
        return self.body(status, items, _usage(prompt_tokens, output_tokens, cached_tokens,
                                                   self.server.engine.prefix.enabled), incomplete)


@router.post("/v1/responses")
async def create_response(req: ResponsesRequest, request: Request, server: Server = Depends(server_of)):
    server.check_model(req.model)
    if req.previous_response_id:
        raise APIError(400, "This server is stateless and stores no responses, so 'previous_response_id' cannot be "
                            "used; send the earlier turns in 'input' instead.", param="previous_response_id",
                       code="unsupported_parameter")
    engine = server.engine
    messages = _messages(req)
    server.check_text("input", message_texts(messages))
    use = _tool_use(req)
    if use is not None:
        server.check_text("tools", [json.dumps(use.rendered)])
    sampling = SamplingFields(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
    params = server.params(sampling, req.max_output_tokens or 1, None)
    params.grammar = await _grammar(server, req, use)
    ids = await server.encode(render_messages(engine, messages, True, use.rendered if use else None))
    params.max_tokens = req.max_output_tokens or max(engine.max_context - len(ids), 1)
    server.check_prompt(ids, params.max_tokens, "input")
    response = _Response(server, req, use)
    delivery, seqs = await server.submit(request, [(0, ids, params)],
                                         "tools" if use and use.constrained else "text.format")
    if not req.stream:
        ev = (await server.collect(request, delivery, seqs, 1))[0]
        server.metrics.observe_finished(seqs)
        response.read(ev.text, last=True)
        return json_answer(response.final(ev.finish_reason, len(ids), ev.completion_tokens, ev.cached_tokens))

    async def events() -> AsyncIterator[str]:
        number = 0

        def event(kind: str, **fields) -> str:
            nonlocal number
            number += 1
            return f"event: {kind}\n" + sse({"type": kind, "sequence_number": number - 1, **fields})

        try:
            yield event("response.created", response=response.body("in_progress", [], None))
            yield event("response.in_progress", response=response.body("in_progress", [], None))
            while True:
                ev = await delivery.next_merged()
                if ev.error:
                    raise APIError(500, ev.error, "server_error")
                for kind, fields in response.read(ev.text, last=bool(ev.finish_reason)):
                    yield event(kind, **fields)
                if ev.finish_reason:
                    break
            server.metrics.observe_finished(seqs)
            final = response.final(ev.finish_reason, len(ids), ev.completion_tokens, ev.cached_tokens)
            yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                        response=final)
        except APIError as e:  # the stream has started: report in band, as OpenAI's `error` event
            yield event("error", code=e.code or e.type, message=e.message, param=e.param)
        finally:
            engine.cancel(seqs)

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
