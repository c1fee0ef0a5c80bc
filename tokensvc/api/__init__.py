"""The gRPC servicers: proto in, domain call, proto out."""

from tokensvc.api.admin import AdminServicer
from tokensvc.api.tokens import TokenServicer

__all__ = ["AdminServicer", "TokenServicer"]
