"""The floor of an HTTP embedding server on this stack, for bench_server.py's ``bare`` mode: uvicorn (as
``embfast serve`` runs it: uvloop, httptools) and the same DynamicBatcher, with nothing else in between: an ASGI
function that reads the body, parses it with orjson, awaits the batcher and writes the OpenAI-shaped answer with
orjson. No validation, error handling, metrics, API key, disconnect watch or body timeout: not a server to run,
a measure of what those cost (``embfast serve``'s HTTP cost per request minus this one's).

    python benchmarks/bare_server.py --port 8001 [--model DIR] [--workers 2]
"""

from __future__ import annotations

import argparse
import os


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as embfast serve
    os.environ.setdefault("EMBFAST_ORT_SPIN", "0")
    import orjson
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
        given = orjson.loads(body)["input"]
        emb, info = await batcher.encode_async([given] if isinstance(given, str) else given, return_info=True)
        tokens = int(info.token_counts.sum())
        out = orjson.dumps({"object": "list", "data": [{"object": "embedding", "index": i, "embedding": v}
                                                        for i, v in enumerate(emb)],
                            "model": name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                           option=orjson.OPT_SERIALIZE_NUMPY)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*headers, (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
