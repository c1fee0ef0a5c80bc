"""tokensvc's gRPC listeners: each a grpc.aio server bound to an address (the
``listen`` setting, and ``admin_listen`` when set), serving TLS when configured."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import grpc

from tokensvc.api.wire import generic_handlers_only
from tokensvc.errors import ConfigurationError
from tokensvc.rpc_metrics import RpcMetrics
from tokensvc.settings import Settings

log = logging.getLogger(__name__)


def listening(settings: Settings, name: str, address: str) -> tuple[grpc.aio.Server, int]:
    """A gRPC server listening on ``address`` (the setting ``name``), and its port."""
    server = grpc.aio.server(
        # Timing every call costs a little: only when someone collects the figures.
        interceptors=[RpcMetrics()] if settings.metrics_listen else [],
        options=[
            ("grpc.max_receive_message_length", 1 << 20),
            # Two processes on one port would split the calls between them.
            ("grpc.so_reuseport", 0),
        ],
    )
    generic_handlers_only(server)
    try:
        if settings.tls_cert:
            port = server.add_secure_port(address, tls_credentials(settings))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConfigurationError(f"cannot listen on {address} ({name}): in use or invalid")
    return server, port


def tls_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS (or mTLS with a client CA) whose files are re-read when they change:
    certificates rotate without a restart, for new connections."""
    paths = [p for p in (settings.tls_cert, settings.tls_key, settings.tls_client_ca) if p]

    def stamp() -> tuple[float, ...]:
        return tuple(
            value
            for p in paths
            for value in (lambda st: (st.st_mtime_ns, st.st_size, st.st_ino))(os.stat(p))
        )

    def load() -> Any:
        assert settings.tls_cert is not None and settings.tls_key is not None
        ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
        return grpc.ssl_server_certificate_configuration(
            [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())],
            root_certificates=ca,
        )

    state = {"stamp": stamp()}

    def fetch() -> Any:
        # Called by gRPC before each handshake: cheap unless a file changed.
        try:
            current = stamp()
            if current == state["stamp"]:
                return None
            state["stamp"] = current
            log.info("TLS files changed: new connections use them")
            return load()
        except OSError:
            return None  # half-written files: keep what works, look again next time

    return grpc.dynamic_ssl_server_credentials(
        load(), fetch, require_client_authentication=settings.tls_client_ca is not None
    )
