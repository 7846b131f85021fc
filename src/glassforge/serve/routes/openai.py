"""OpenAI's API: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, `POST /v1/embeddings`.

Each route checks and translates its request (prompts to ids, fields to
`SamplingParams`) and hands the rest to serving.py: the context check, the
queue, the stream or the whole answer. What differs between completions and
chat is only how an event becomes a choice (`CompletionChoices`,
`ChatChoices`). Behaviours clients rely on:

- Completions `echo` with `logprobs` returns prompt log-probs (first entry
  null) in the legacy shape; `max_tokens: 0` with echo scores the prompt only.
- `n` choices of one prompt share its prefill; usage counts each prompt once.
- `response_format` json_object/json_schema is constrained decoding
  (grammar.py): the reply ends when the JSON is complete. Without llguidance
  installed it is a 400 naming the parameter.
- `tools` and `tool_choice` (tools.py): calls come back in OpenAI's shapes,
  `finish_reason: "tool_calls"`; with `required` or a named function the
  arguments are constrained to the tool's schema. A stream announces each
  call (index, id, type, name) before its arguments arrive as JSON text.
- Embeddings are the mean of the final hidden states, L2-normalised, as floats
  or base64 little-endian float32. A batch runs on the engine thread in
  pieces of about `EMBED_TOKENS_PER_CALL` tokens, so decode steps for other
  clients go on between them (5,000 inputs at once held a chat for 12 s).

Every size a request may ask for is checked before its text is tokenized
(serving.py's `Server.check_text`, `stop_list`; limits.py's `Limits`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from glassforge.core.errors import UserError
from glassforge.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    NamedToolChoice,
    ToolChoice,
    chat_logprobs,
    legacy_logprobs,
)
from glassforge.serve.serving import (
    MAX_SEQUENCES_PER_REQUEST,
    Server,
    json_answer,
    message_texts,
    prompt_list,
    render_messages,
    server_of,
    usage,
)
from glassforge.serve.tools import CallParser, Piece, compile_tool_grammar, parse_calls, tool_use
from glassforge.serve.types import Event

router = APIRouter()
EMBED_TOKENS_PER_CALL = 1024  # tokens of one embeddings batch the engine thread runs between decode steps


# --- models --------------------------------------------------------------------------------

def model_card(server: Server) -> dict:
    return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "glassforge",
            "max_model_len": server.engine.max_context}


@router.get("/v1/models")
async def list_models(server: Server = Depends(server_of)) -> dict:
    return {"object": "list", "data": [model_card(server)]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, server: Server = Depends(server_of)) -> dict:
    server.check_model(model)
    return model_card(server)


# --- completions ---------------------------------------------------------------------------

class CompletionChoices:
    """Completions' choices: text (the prompt first, with echo) and legacy log-probs."""

    object = chunk_object = "text_completion"

    def __init__(self, prompt_texts: list[str], n: int, echo: bool, logprobs: int | None,
                 scored: list[dict] | None = None):
        self.prompt_texts, self.n, self.echo, self.logprobs = prompt_texts, n, echo, logprobs
        self.scored = scored or []  # a scoring-only answer's choices, all known before the stream starts
        self.started: set[int] = set()

    def _content(self, ev: Event) -> tuple[str, dict | None]:
        """The text and log-probs ev adds; a choice's first event carries the echoed prompt."""
        prompt = self.prompt_texts[ev.index // self.n]
        first = ev.index not in self.started
        self.started.add(ev.index)
        text = prompt + ev.text if self.echo and first else ev.text
        if self.logprobs is None:
            return text, None
        generated = legacy_logprobs(ev.tokens, len(prompt) if self.echo else 0)
        if not (self.echo and ev.prompt_logprobs):
            return text, generated
        echoed = legacy_logprobs(ev.prompt_logprobs)
        return text, {k: echoed[k] + generated[k] for k in generated}

    def opening(self) -> list[dict]:
        return self.scored

    def delta(self, ev: Event) -> dict | None:
        text, lp = self._content(ev)
        if not text and not (lp and lp["tokens"]):
            return None
        return {"index": ev.index, "text": text, "logprobs": lp, "finish_reason": None}

    def final(self, index: int, finish_reason: str) -> dict:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}

    def whole(self, ev: Event) -> dict:
        text, lp = self._content(ev)
        return {"index": ev.index, "text": text, "logprobs": lp, "finish_reason": ev.finish_reason}


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, server: Server = Depends(server_of)):
    server.check_model(req.model)
    engine = server.engine
    n = req.n or 1
    if req.best_of not in (None, 1, n):
        raise APIError(400, "'best_of' other than n is not supported", param="best_of")
    prompts = prompt_list(req.prompt, "prompt")
    if len(prompts) * n > MAX_SEQUENCES_PER_REQUEST:
        raise APIError(400, f"at most {MAX_SEQUENCES_PER_REQUEST} prompts x n per request", param="n")
    server.check_text("prompt", [p for p in prompts if isinstance(p, str)])
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    prompt_k = req.logprobs if req.echo and req.logprobs is not None else None
    params = server.params(req, max_tokens, req.logprobs, prompt_k)
    if req.trace:
        server.tracer(param="trace")
    texts, id_lists = [], []
    for p in prompts:
        ids = await server.encode(p) if isinstance(p, str) else list(p)
        server.check_prompt(ids, max_tokens, "prompt")  # before decoding ids: they must be in the vocabulary
        texts.append(p if isinstance(p, str) else engine.decode(ids))
        id_lists.append(ids)
    base = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": server.model_name}
    prompt_tokens = sum(len(ids) for ids in id_lists)  # each prompt counted once, whatever n

    if max_tokens == 0:  # score (echo) only: no sequence runs
        scored = [await asyncio.wrap_future(engine.call(lambda ids=ids: engine.score(ids, prompt_k)))
                  for ids in id_lists]
        out = [{"index": pi * n + j, "text": text if req.echo else "",
                "logprobs": legacy_logprobs(lp) if lp is not None else None, "finish_reason": "length"}
               for pi, (text, lp) in enumerate(zip(texts, scored)) for j in range(n)]
        choices = CompletionChoices(texts, n, bool(req.echo), req.logprobs, scored=out)
        if req.stream:
            return server.stream({**base, "object": choices.chunk_object}, choices, req.include_usage,
                                 prompt_tokens, trace=False)
        return json_answer({**base, "object": choices.object, "choices": out, "usage": usage(prompt_tokens, 0)})

    requests = [(pi * n + j, ids, params) for pi, ids in enumerate(id_lists) for j in range(n)]
    return await server.answer(request, req, requests, base, prompt_tokens,
                               CompletionChoices(texts, n, bool(req.echo), req.logprobs))


# --- chat ----------------------------------------------------------------------------------

class ChatChoices:
    """Chat's choices: a role chunk first, content and tool-call deltas, the assistant message when whole."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, n: int, logprobs: bool, tool_names: set[str] | None = None):
        self.n, self.logprobs, self.tool_names = n, logprobs, tool_names
        self.parsers = {j: CallParser(tool_names) for j in range(n)} if tool_names is not None else {}

    def opening(self) -> list[dict]:
        return [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for j in range(self.n)]

    @staticmethod
    def _delta(piece: Piece) -> dict:
        delta: dict = {}
        if piece.content:
            delta["content"] = piece.content
        if piece.deltas:
            delta["tool_calls"] = piece.deltas
        return delta

    def delta(self, ev: Event) -> dict | None:
        lp = chat_logprobs(ev.tokens) if self.logprobs and ev.tokens else None
        delta = self._delta(self.parsers[ev.index].feed(ev.text)) if self.parsers else \
            ({"content": ev.text} if ev.text else {})
        if not delta and not lp:
            return None
        return {"index": ev.index, "delta": delta or {"content": ""}, "logprobs": lp, "finish_reason": None}

    def final(self, index: int, finish_reason: str) -> dict:
        parser = self.parsers.get(index)
        delta = self._delta(parser.finish()) if parser else {}
        if parser and parser.calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def whole(self, ev: Event) -> dict:
        message = {"role": "assistant", "content": ev.text, "refusal": None}
        finish_reason = ev.finish_reason
        if self.tool_names is not None:
            content, calls = parse_calls(ev.text, self.tool_names)
            message["content"] = content if content.strip() or not calls else None
            if calls:
                message["tool_calls"] = [{"id": c.id, "type": "function",
                                          "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return {"index": ev.index, "message": message,
                "logprobs": chat_logprobs(ev.tokens) if self.logprobs else None, "finish_reason": finish_reason}


async def response_grammar(server: Server, req: ChatRequest) -> str | None:
    """The llguidance grammar response_format asks for (None for text)."""
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    schema = None
    if rf.type == "json_schema":
        schema = (rf.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format json_schema needs {'name': ..., 'schema': {...}}",
                           param="response_format")
    try:
        return await server.work.run(lambda: server.engine.grammars.json_grammar(schema))
    except UserError as e:
        raise APIError(400, f"response_format: {e}", param="response_format") from None


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request, server: Server = Depends(server_of)):
    server.check_model(req.model)
    engine = server.engine
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    n = req.n or 1
    server.check_text("messages", message_texts(req.messages))
    limit = req.max_completion_tokens or req.max_tokens
    # every field is checked before the text is tokenized; max_tokens is known only after, without a limit
    params = server.params(req, limit or 1, (req.top_logprobs or 0) if req.logprobs else None)
    if req.trace:
        server.tracer(param="trace")
    params.grammar = await response_grammar(server, req)
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    use = tool_use([t["function"] for t in tools], _choice_name(req.tool_choice), req.parallel_tool_calls,
                   rendered=tools)
    if use is not None:
        server.check_text("tools", [json.dumps(tools)])
        if use.constrained:
            if params.grammar is not None:
                raise APIError(400, "'response_format' cannot be combined with a 'tool_choice' that requires a "
                                    "tool call", param="tool_choice")
            params.grammar = await server.work.run(lambda: compile_tool_grammar(engine.grammars, use))
    ids = await server.encode(render_messages(engine, req.messages, True, use.rendered if use else None))
    params.max_tokens = limit if limit is not None else max(engine.max_context - len(ids), 1)
    server.check_prompt(ids, params.max_tokens, "messages")
    # no system_fingerprint: OpenAI's schema has it deprecated, and a string when present (never null)
    base = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": server.model_name}
    return await server.answer(request, req, [(j, ids, params) for j in range(n)], base, len(ids),
                               ChatChoices(n, bool(req.logprobs), use.parsed if use else None),
                               "tools" if use and use.constrained else "response_format")


def _choice_name(choice: ToolChoice) -> str | None:
    """tool_choice as tools.tool_use takes it: a mode, or the named function's name."""
    return choice.function.name if isinstance(choice, NamedToolChoice) else choice


# --- embeddings ----------------------------------------------------------------------------

@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, server: Server = Depends(server_of)) -> JSONResponse:
    import numpy as np

    server.check_model(req.model)
    engine = server.engine
    if req.dimensions is not None and req.dimensions != engine.cfg.d_model:
        raise APIError(400, f"'dimensions' must be {engine.cfg.d_model} for this model (no truncation)",
                       param="dimensions")
    items = prompt_list(req.input, "input")
    server.check_count("input", len(items), "max_embedding_inputs", "inputs")
    texts = [item for item in items if isinstance(item, str)]
    size = server.check_text("input", texts)
    encoded = iter(await server.work.run(lambda: [engine.encode(t) for t in texts], size))
    batch = []
    for item in items:
        ids = next(encoded) if isinstance(item, str) else list(item)
        server.check_prompt(ids, 0, "input")
        batch.append(ids)
    vectors: list = []
    start = 0
    while start < len(batch):  # in pieces, each a job of its own: decode steps run between them
        end, tokens = start, 0
        while end < len(batch) and (end == start or tokens + len(batch[end]) <= EMBED_TOKENS_PER_CALL):
            tokens += len(batch[end])
            end += 1
        piece = batch[start:end]
        vectors += await asyncio.wrap_future(engine.call(lambda piece=piece: engine.embed(piece)))
        start = end
    data = []
    for i, vec in enumerate(vectors):
        emb: Any = vec
        if req.encoding_format == "base64":
            emb = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n_tokens = sum(len(b) for b in batch)
    return json_answer({"object": "list", "data": data, "model": server.model_name,
                        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})
