"""`POST /v1/trace`: the training-data spans found in a text, from the release's trace index.

A release without an index answers the same 400 `trace_unavailable` as
`trace: true` on a completion does (serving.py says why 400).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from glassforge.serve.protocol import TraceRequest
from glassforge.serve.serving import Server, server_of

router = APIRouter()


@router.post("/v1/trace")
async def trace(req: TraceRequest, server: Server = Depends(server_of)) -> dict:
    server.check_model(req.model)
    tracer = server.tracer(param=None)
    return await asyncio.to_thread(tracer.trace, req.text, req.min_tokens or 8, req.max_docs or 5)
