"""Server-Sent Events written straight onto the ASGI connection.

Starlette's StreamingResponse runs every stream inside an anyio task group with a cancel scope
and a second task listening for the disconnect: at thousands of short streams a second that was
a fifth of the scheduler's HTTP front (docs/benchmarks.md, "Data plane"). This response does
the same with one plain asyncio task watching for the disconnect, which cancels the writer.

A slow client is bounded as before: `send` waits while the connection's write buffer is over
its high-water mark (uvicorn's flow control), so its tokens wait in the coordinator, which ends
the request once they pass max_stream_lag_tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE = "data: [DONE]\n\n"


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """`text/event-stream` from an async generator of ready-made events (one write each); the
    generator is closed (and its request aborted) when the client leaves."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        self.status_code = 200
        self.background = None
        self.events = events
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writer = asyncio.current_task()
        assert writer is not None
        has_left = is_sent = False

        def left(watch: asyncio.Task[None]) -> None:
            # uvicorn's receive also answers http.disconnect once the response is complete.
            nonlocal has_left
            if not is_sent and not watch.cancelled() and watch.exception() is None:
                has_left = True
                writer.cancel()

        watch = asyncio.get_running_loop().create_task(_until_disconnect(receive))
        watch.add_done_callback(left)
        try:
            async with contextlib.aclosing(self.events) as events:
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
                async for event in events:
                    await send(
                        {"type": "http.response.body", "body": event.encode(), "more_body": True}
                    )
                is_sent = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not has_left:
                raise
            writer.uncancel()  # our own cancel: the client left; nothing more to send
        finally:
            watch.remove_done_callback(left)
            watch.cancel()
