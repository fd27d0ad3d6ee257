"""A caller without the token is refused before its message is decoded, or even received: a
real grpc.aio server with the bearer-token interceptor, whose method's request deserializer
counts its calls, and whose receive limit a received message would exceed."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from cascadeinfer.security import BearerTokenInterceptor

METHOD = "/test.Echo/Call"


def test_a_strangers_message_is_refused_unread() -> None:
    decoded: list[bytes] = []

    def deserialize(raw: bytes) -> bytes:
        decoded.append(raw)
        return raw

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Call": grpc.unary_unary_rpc_method_handler(
                echo, request_deserializer=deserialize, response_serializer=bytes
            )
        },
    )

    async def scenario() -> None:
        server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor("secret")],
            options=[("grpc.max_receive_message_length", 1 << 20)],
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary(METHOD)
                for metadata in ((), (("authorization", "Bearer wrong"),)):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await call(b"x" * 4096, metadata=metadata, timeout=10)
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert decoded == [], "a refused message was decoded"
                # Received, it would be refused for its size (RESOURCE_EXHAUSTED): a stranger's
                # calls of 60 MiB each were read whole before the refusal, and twelve at once
                # held a worker at 955 MiB.
                big = channel.unary_unary(METHOD)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await big(b"x" * (4 << 20), timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()
                ok = await call(b"hi", metadata=(("authorization", "Bearer secret"),), timeout=10)
                assert ok == b"hi" and decoded == [b"hi"]
        finally:
            await server.stop(None)

    asyncio.run(scenario())
