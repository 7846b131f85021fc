"""Operations: `GET /health` (no API key needed: load balancers and benchmarks poll it) and `GET /metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from glassforge.serve.serving import Server, server_of

router = APIRouter()


@router.get("/health")
async def health(server: Server = Depends(server_of)) -> dict:
    # decode_compile: whether decode steps already run compiled; decode_aot: the same for the steps
    # compiled ahead of time after them (benchmarks wait for both to leave "waiting"/"compiling")
    return {"status": "ok", **server.engine.compiler.health()}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(server: Server = Depends(server_of)) -> PlainTextResponse:
    return PlainTextResponse(server.metrics.render(server.engine), media_type="text/plain; version=0.0.4")
