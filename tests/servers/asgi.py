# The ASGI app uvicorn serves in tests/servers.rs (same answer as wsgi.py).
import os


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = (
        f"pid={os.getpid()} generation={os.environ.get('CLUSTER_GENERATION')} "
        f"worker={os.environ.get('WORKER_ID')} server=uvicorn\n"
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
