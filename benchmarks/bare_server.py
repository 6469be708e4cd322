"""The floor of an HTTP embedding server on this stack, for bench_server.py's ``bare`` mode: uvicorn (as
``embfast serve`` runs it: uvloop, httptools) and the same DynamicBatcher, with nothing else in between: an ASGI
function that reads the body, parses it with orjson, awaits the batcher and writes the OpenAI-shaped answer with
orjson. No validation, error handling, metrics, API key, disconnect watch or body timeout: not a server to run,
a measure of what those cost (``embfast serve``'s HTTP cost per request minus this one's).

    python benchmarks/bare_server.py --port 8001 [--model DIR] [--workers 2] [--raw]

``--raw`` goes one step lower: no ASGI server at all, an asyncio protocol on uvloop that parses HTTP/1.1 with
httptools (the parser uvicorn uses) and writes each answer, headers and body, in one ``write``: what HTTP costs
with no Python framework in the way (bench_server.py's ``raw`` mode).
"""

from __future__ import annotations

import argparse
import os

import orjson


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="httptools on uvloop, no ASGI server")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as embfast serve
    os.environ.setdefault("EMBFAST_ORT_SPIN", "0")
    import uvicorn

    from embfast import Embedder
    from embfast.dynamic import DynamicBatcher

    model = Embedder(args.model, precision=args.precision, threads=args.threads) if args.model else \
        Embedder(precision=args.precision, threads=args.threads)
    batcher = DynamicBatcher(model, max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
                             max_queue=100000, workers=args.workers)
    name = "embfast"
    headers = [(b"content-type", b"application/json")]

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    batcher.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        out = await embed_answer(batcher, name, body)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*headers, (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})

    if args.raw:
        return serve_raw(batcher, name, args.port)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


async def embed_answer(batcher, name: str, body: bytes) -> bytes:
    """The OpenAI-shaped answer (orjson) to an OpenAI request body, from ``batcher``: both servers' only work."""
    given = orjson.loads(body)["input"]
    emb, info = await batcher.encode_async([given] if isinstance(given, str) else given, return_info=True)
    tokens = int(info.token_counts.sum())
    return orjson.dumps({"object": "list", "data": [{"object": "embedding", "index": i, "embedding": v}
                                                    for i, v in enumerate(emb)],
                         "model": name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                        option=orjson.OPT_SERIALIZE_NUMPY)


def serve_raw(batcher, name: str, port: int) -> int:
    """POST with an OpenAI body on any path, keep-alive, one request at a time per connection (as wrk sends)."""
    import asyncio

    import httptools
    import uvloop

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.parser, self.body = transport, httptools.HttpRequestParser(self), []

        def data_received(self, data):
            self.parser.feed_data(data)

        def on_body(self, body):
            self.body.append(body)

        def on_message_complete(self):
            body, self.body = b"".join(self.body), []
            asyncio.ensure_future(self.answer(body, self.parser.should_keep_alive()))

        async def answer(self, body, keep_alive):
            out = await embed_answer(batcher, name, body)
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"\r\n%s" % (len(out), out))
            if not keep_alive:
                self.transport.close()

    async def main():
        server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.install()
    try:
        asyncio.run(main())
    finally:
        batcher.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
