"""The per-RPC figures: a gRPC server interceptor that times every call and
counts the messages of every server stream (the metrics are in tokensvc.metrics)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc

from tokensvc.metrics import RPC_DURATION, RPC_RESPONSES


class RpcMetrics(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """``rpc_server_call_duration_seconds`` for every method, unary or
    streaming (a stream lasts until its last message or its end), and
    messages sent per server stream. Wrapped handlers are made once per
    method, and label lookups once per method and status."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        details: Any,
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        known = self._wrapped.get(details.method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _wrap(details.method.lstrip("/"), handler)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped


def _status(context: Any, error: BaseException | None) -> str:
    """The status code's name, as rpc.response.status_code wants it."""
    code = context.code()  # set by abort() or set_code()
    if code is not None:
        return str(code.name if isinstance(code, grpc.StatusCode) else code)
    if error is None:
        return "OK"
    # asyncio.CancelledError: the client went away or the deadline passed.
    return "UNKNOWN" if isinstance(error, Exception) else "CANCELLED"


def _wrap(method: str, handler: Any) -> Any:
    durations: dict[str, Any] = {}

    def observe(context: Any, error: BaseException | None, started: float) -> None:
        status = _status(context, error)
        child = durations.get(status)
        if child is None:
            child = durations[status] = RPC_DURATION.labels("grpc", method, status)
        child.observe(time.perf_counter() - started)

    if not handler.response_streaming:
        behavior = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            try:
                response = await behavior(request, context)
            except BaseException as exc:
                observe(context, exc, started)
                raise
            observe(context, None, started)
            return response

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(unary, handler.request_deserializer, handler.response_serializer)

    behavior = handler.unary_stream or handler.stream_stream
    responses = RPC_RESPONSES.labels("grpc", method)

    async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
        started = time.perf_counter()
        sent = 0
        try:
            result = behavior(request, context)
            if hasattr(result, "__aiter__"):
                async with aclosing(result):
                    async for message in result:
                        sent += 1
                        yield message
            else:
                await result  # writes with context.write
        except BaseException as exc:
            observe(context, exc, started)
            responses.observe(sent)
            raise
        observe(context, None, started)
        responses.observe(sent)

    factory = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    return factory(streaming, handler.request_deserializer, handler.response_serializer)
