"""A server interceptor that answers INVALID_ARGUMENT for request bytes that do not parse as the
method's protobuf message. grpc-python would otherwise answer INTERNAL ("Exception deserializing
request!"), which tells the caller nothing about whose fault it is."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc


class _Malformed:
    """Stands in for a request that failed to parse; the handler wrapper rejects it."""

    def __init__(self, error: Exception) -> None:
        self.error = error


async def _reject(context: grpc.aio.ServicerContext, bad: _Malformed) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"the request is not a valid protobuf message for this method: {bad.error}")


def _safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's input
            return _Malformed(exc)

    return parse


async def _checked_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Malformed):
            await _reject(context, request)
        yield request


def _checked(behaviour: Callable[..., Any], streaming_request: bool) -> Callable[..., Any]:
    """`behaviour` with its request (or each streamed request) checked first. Keeps its kind:
    an async generator stays one; a coroutine (which may write with context.write) stays one."""

    async def first(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if streaming_request:
            return _checked_stream(request, context)
        if isinstance(request, _Malformed):
            await _reject(context, request)
        return request

    if inspect.isasyncgenfunction(behaviour):
        async def generator(request: Any, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[Any]:
            async for response in behaviour(await first(request, context), context):
                yield response

        return generator

    async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behaviour(await first(request, context), context)

    return coroutine


_FACTORIES: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        for kind, factory in _FACTORIES.items():
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return factory(_checked(behaviour, kind.startswith("stream")),
                               _safe_deserializer(handler.request_deserializer),
                               handler.response_serializer)
        return handler
