"""An OpenAI-compatible engine that does no work: it streams `max_tokens` one-word pieces at
once. Served through the `server` backend, what a request costs on it is the HTTP path's
own cost (the client's rendering, tokenizing, request, stream parsing, counting, plus this
server's few steps), an upper bound on what the client adds to a real engine's request.
It runs on starlette and uvicorn, which the serving extra (`transformers[serving]`) brings.
With --metrics it also reports each request's own latency on /metrics, as vLLM does.

    python bench/null_engine.py --port 8000 [--metrics]
"""

from __future__ import annotations

import argparse
import json
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL_ID = "null-engine"
WORD = " a"


async def models(_: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})


def _chunk(text: str, finish: str | None = None, usage: dict | None = None) -> str:
    body = {"object": "text_completion", "model": MODEL_ID,
            "choices": [] if usage else [{"index": 0, "text": text, "finish_reason": finish}]}
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def make_app(metrics: bool) -> Starlette:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    registry = CollectorRegistry()
    latency = Histogram("null_engine_e2e_request_latency_seconds", "a request's time in the engine",
                        registry=registry)

    async def completions(request: Request):
        t0 = time.perf_counter()
        body = await request.json()
        n = int(body.get("max_tokens") or 16)
        usage = {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}
        if not body.get("stream"):
            return JSONResponse({"object": "text_completion", "model": MODEL_ID, "usage": usage,
                                 "choices": [{"index": 0, "text": WORD * n, "finish_reason": "length"}]})

        async def pieces():
            for i in range(n):
                yield _chunk(WORD, "length" if i == n - 1 else None)
            yield _chunk("", usage=usage)
            latency.observe(time.perf_counter() - t0)
            yield "data: [DONE]\n\n"

        return StreamingResponse(pieces(), media_type="text/event-stream")

    async def exposition(_: Request) -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    routes = [Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes + ([Route("/metrics", exposition)] if metrics else []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--metrics", action="store_true", help="serve /metrics with each request's latency")
    p.add_argument("model", nargs="?", help="ignored: there are no weights")
    args = p.parse_args()
    uvicorn.run(make_app(args.metrics), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
