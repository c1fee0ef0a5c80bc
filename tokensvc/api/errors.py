"""Turns domain errors into gRPC statuses with a google.rpc.ErrorInfo detail."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from tokensvc.errors import DOMAIN, TokenSvcError, grpc_status_of

log = logging.getLogger(__name__)

R = TypeVar("R")
# grpc.aio.ServicerContext; grpc ships no type stubs, so it is Any to mypy.
Context: TypeAlias = Any


async def abort(context: Context, error: TokenSvcError) -> NoReturn:
    code = grpc_status_of(error)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=DOMAIN, metadata=error.metadata()
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=error.message, details=[detail])
    await context.abort(
        code,
        error.message,
        trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
    )
    raise AssertionError("unreachable")  # context.abort raises


def handles_errors(
    method: Callable[..., Awaitable[R]],
) -> Callable[..., Awaitable[R]]:
    """Servicer method decorator: TokenSvcError → its status; anything else →
    INTERNAL with no detail (its message could hold anything)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context, *more: Any) -> R:
        try:
            return await method(self, request, context, *more)
        except TokenSvcError as exc:
            await abort(context, exc)
        except (grpc.aio.AbortError, KeyboardInterrupt):
            raise
        except Exception as exc:
            log.error(
                "unexpected error",
                extra={"method": method.__name__, "exc_type": type(exc).__name__},
            )
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")
        raise AssertionError("unreachable")

    return wrapper
