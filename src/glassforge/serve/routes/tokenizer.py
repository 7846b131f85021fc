"""The tokenizer routes lm-evaluation-harness probes: `/tokenizer_info`, `/tokenize`, `/detokenize` (vLLM's shapes).

Text to tokenize is bounded by `--max-text-chars`, ids to detokenize by as many ids; long ones are
worked on off the event loop (serving.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from glassforge.serve.protocol import APIError, DetokenizeRequest, TokenizeRequest
from glassforge.serve.serving import Server, json_answer, message_texts, render_messages, server_of
from glassforge.tokenizer.bpe import END, PAD

router = APIRouter()


@router.get("/tokenizer_info")
async def tokenizer_info(server: Server = Depends(server_of)) -> dict:
    engine = server.engine
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": END, "eos_token_id": engine.end_id,
            "bos_token": None, "bos_token_id": None, "pad_token": PAD,
            "pad_token_id": engine.tokenizer.token_to_id(PAD), "chat_template": engine.chat_template,
            "vocab_size": engine.vocab_size, "model_max_length": engine.max_context}


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, server: Server = Depends(server_of)) -> JSONResponse:
    server.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
    if req.prompt is not None:
        server.check_text("prompt", [req.prompt])
        text = req.prompt
    else:
        server.check_text("messages", message_texts(req.messages))
        text = render_messages(server.engine, req.messages, bool(req.add_generation_prompt))
    ids = await server.encode(text)
    return json_answer({"tokens": ids, "count": len(ids), "max_model_len": server.engine.max_context})


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, server: Server = Depends(server_of)) -> dict:
    server.check_model(req.model)
    server.check_count("tokens", len(req.tokens), "max_text_chars", "token ids")
    bad = [t for t in req.tokens if not 0 <= t < server.engine.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param="tokens")
    return {"prompt": await server.work.run(lambda: server.engine.decode(req.tokens), len(req.tokens))}
