"""A server interceptor that answers INVALID_ARGUMENT for request bytes that do not parse as the
method's protobuf message. grpc-python would otherwise answer INTERNAL ("Exception deserializing
request!"), which tells the caller nothing about whose fault it is."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc


class _Malformed:
    """Stands in for a request that failed to parse; the handler wrapper rejects it."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _reject(context: grpc.ServicerContext, bad: _Malformed) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                  f"the request is not a valid protobuf message for this method: {bad.error}")


def _safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's input
            return _Malformed(exc)

    return parse


def _checked_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, _Malformed):
            _reject(context, request)
        yield request


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = _safe_deserializer(handler.request_deserializer)
        serialize = handler.response_serializer
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Malformed):
                    _reject(context, request)
                return inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, parse, serialize)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                if isinstance(request, _Malformed):
                    _reject(context, request)
                return inner_us(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, parse, serialize)
        if handler.stream_unary:
            inner_su = handler.stream_unary

            def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                return inner_su(_checked_stream(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, parse, serialize)
        inner_ss = handler.stream_stream

        def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext
                          ) -> Iterator[Any]:
            return inner_ss(_checked_stream(requests, context), context)

        return grpc.stream_stream_rpc_method_handler(stream_stream, parse, serialize)
