"""`POST /v1/trace`: the training-data spans found in a text, from the release's trace index.

A release without an index answers the same 400 `trace_unavailable` as
`trace: true` on a completion does (serving.py says why 400). The text is
bounded by `--max-trace-chars` (tracing costs about 400 bytes a character
at its peak: three traces of 6 MiB took the server to 9.7 GB) and traced on
the work threads, off the event loop.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from glassforge.serve.protocol import TraceRequest
from glassforge.serve.serving import Server, json_answer, server_of

router = APIRouter()


@router.post("/v1/trace")
async def trace(req: TraceRequest, server: Server = Depends(server_of)) -> JSONResponse:
    server.check_model(req.model)
    server.check_text("text", [req.text], "max_trace_chars")
    return json_answer(await server.trace_text(req.text, req.min_tokens or 8, req.max_docs or 5, param=None))
