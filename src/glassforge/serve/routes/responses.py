"""`POST /v1/responses`: OpenAI's Responses API, stateless, over the same engine as chat completions.

What it takes: `input` as a text or as messages (text content), `instructions`
(a system message before them), `max_output_tokens`, `temperature`, `top_p`,
`text.format` (text, a JSON object, or a JSON schema, constrained through
llguidance as chat's `response_format` is), `stream`, and `seed` as an
extension. The prompt is the chat template's rendering of those messages, so
a response and a chat completion of the same messages and settings are the
same text (tested).

Stateless, as Ollama's and llama-server's: nothing is stored, so
`previous_response_id` (which needs the stored earlier turns) is an
OpenAI-shaped 400 that says to send the earlier turns in `input`, and the
answer says `store: false`. Tools are not taken here yet (a 400 naming
`tools`).

A stream is the event sequence the openai client's `responses.stream` reads:
`response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, one `response.output_text.delta` per piece
of text, `response.output_text.done`, `response.content_part.done`,
`response.output_item.done`, then `response.completed` (or, when
`max_output_tokens` cut it, `response.incomplete` with the reason), each with
its `sequence_number`.
"""

from __future__ import annotations

import secrets
import time
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from glassforge.core.errors import UserError
from glassforge.serve.protocol import APIError, ChatMessage, ResponsesRequest, SamplingFields, TextPart
from glassforge.serve.serving import SSE_HEADERS, Server, json_answer, message_texts, render_messages, server_of, sse

router = APIRouter()


def _messages(req: ResponsesRequest) -> list[ChatMessage]:
    messages = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    if isinstance(req.input, str):
        return messages + [ChatMessage(role="user", content=req.input)]
    for m in req.input:
        content = m.content if isinstance(m.content, str) else [TextPart(type="text", text=p.text) for p in m.content]
        messages.append(ChatMessage(role=m.role, content=content))
    if not messages:
        raise APIError(400, "'input' holds no message", param="input")
    return messages


async def _grammar(server: Server, req: ResponsesRequest) -> str | None:
    fmt = req.text.format if req.text else None
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


def _message_item(item_id: str, text: str | None, status: str) -> dict:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def _usage(prompt_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


class _Response:
    """The response object at each point of its life: created, in progress, completed or incomplete."""

    def __init__(self, server: Server, req: ResponsesRequest):
        self.id, self.item_id = f"resp_{secrets.token_hex(12)}", f"msg_{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.server, self.req = server, req

    def body(self, status: str, output: list[dict], usage: dict | None, incomplete: bool = False) -> dict:
        req = self.req
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format \
            else {"type": "text"}
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": None, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
                "model": self.server.model_name, "output": output, "parallel_tool_calls": False,
                "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
                "temperature": 1.0 if req.temperature is None else req.temperature,
                "text": {"format": fmt}, "tool_choice": "none", "tools": [],
                "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled", "usage": usage,
                "user": req.user, "metadata": req.metadata or {}}

    def final(self, text: str, finish_reason: str | None, prompt_tokens: int, output_tokens: int) -> dict:
        incomplete = finish_reason == "length"
        status = "incomplete" if incomplete else "completed"
        return self.body(status, [_message_item(self.item_id, text, status)], _usage(prompt_tokens, output_tokens),
                         incomplete)


@router.post("/v1/responses")
async def create_response(req: ResponsesRequest, request: Request, server: Server = Depends(server_of)):
    server.check_model(req.model)
    if req.previous_response_id:
        raise APIError(400, "This server is stateless and stores no responses, so 'previous_response_id' cannot be "
                            "used; send the earlier turns in 'input' instead.", param="previous_response_id",
                       code="unsupported_parameter")
    if req.tools:
        raise APIError(400, "'tools' are not supported on /v1/responses by this server", param="tools",
                       code="unsupported_parameter")
    engine = server.engine
    messages = _messages(req)
    server.check_text("input", message_texts(messages))
    sampling = SamplingFields(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
    params = server.params(sampling, req.max_output_tokens or 1, None)
    params.grammar = await _grammar(server, req)
    ids = await server.encode(render_messages(engine, messages, True))
    params.max_tokens = req.max_output_tokens or max(engine.max_context - len(ids), 1)
    server.check_prompt(ids, params.max_tokens, "input")
    response = _Response(server, req)
    delivery, seqs = await server.submit(request, [(0, ids, params)])
    if not req.stream:
        ev = (await server.collect(request, delivery, seqs, 1))[0]
        server.metrics.observe_finished(seqs)
        return json_answer(response.final(ev.text, ev.finish_reason, len(ids), ev.completion_tokens))

    async def events() -> AsyncIterator[str]:
        number = 0

        def event(kind: str, **fields) -> str:
            nonlocal number
            number += 1
            return f"event: {kind}\n" + sse({"type": kind, "sequence_number": number - 1, **fields})

        where = {"item_id": response.item_id, "output_index": 0, "content_index": 0}
        text = ""
        try:
            yield event("response.created", response=response.body("in_progress", [], None))
            yield event("response.in_progress", response=response.body("in_progress", [], None))
            yield event("response.output_item.added", output_index=0,
                        item=_message_item(response.item_id, None, "in_progress"))
            yield event("response.content_part.added", **where,
                        part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            while True:
                ev = await delivery.next_merged()
                if ev.error:
                    raise APIError(500, ev.error, "server_error")
                if ev.text:
                    text += ev.text
                    yield event("response.output_text.delta", **where, delta=ev.text, logprobs=[])
                if ev.finish_reason:
                    break
            server.metrics.observe_finished(seqs)
            final = response.final(text, ev.finish_reason, len(ids), ev.completion_tokens)
            item = final["output"][0]
            yield event("response.output_text.done", **where, text=text, logprobs=[])
            yield event("response.content_part.done", **where, part=item["content"][0])
            yield event("response.output_item.done", output_index=0, item=item)
            yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                        response=final)
        except APIError as e:  # the stream has started: report in band, as OpenAI's `error` event
            yield event("error", code=e.code or e.type, message=e.message, param=e.param)
        finally:
            engine.cancel(seqs)

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

