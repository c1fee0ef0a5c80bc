"""TLS contexts of outbound connections: whom to trust, and which client
certificate to present (RFC 8705).

Trust is the default CA store plus, when the operator gives one, a PEM file of
more CAs (``outbound_ca_file``). The file is looked at on every use (its
mtime, size and inode; a ``stat``, no read) and read again when it changed, so
a CA replaced while tokensvc runs is used by the next new connection. A file
that no longer parses keeps the trust that worked, with a warning. There is no
way to turn verification off.

A client certificate's private key never touches a disk: ``load_cert_chain``
takes only file names, so chain and key are written to an anonymous memory
file (``memfd_create``, Linux), loaded through ``/proc/self/fd/N``, and the
file is closed right after; nothing of it exists once it is closed.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

import httpcore2
from cryptography import x509

log = logging.getLogger(__name__)

MAX_CA_FILE = 4 * 1024 * 1024


def read_ca_file(path: Path) -> str:
    """The PEM certificates of ``path``; ValueError says what is wrong with it."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CA_FILE + 1)
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({exc.strerror})") from None
    if len(data) > MAX_CA_FILE:
        raise ValueError(f"{path} is larger than {MAX_CA_FILE} bytes")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise ValueError(
            f"{path} holds no PEM certificates: give CA certificates "
            "(-----BEGIN CERTIFICATE-----), one after the other"
        )
    return data.decode("ascii", errors="replace")


class OutboundTrust:
    """The trust of every outbound TLS connection; ``generation`` grows each
    time the CA file changed, so that holders of older contexts know to
    build new ones."""

    def __init__(self, ca_file: Path | None = None) -> None:
        self._ca_file = ca_file
        self._stamp: tuple[int, ...] | None = None
        self._refused: tuple[int, ...] | None = None
        self._ca_pem = ""
        self._context: ssl.SSLContext | None = None
        self.generation = 0
        self.context()  # a bad file fails here, at start

    def context(self) -> ssl.SSLContext:
        """The current trust, read again if the CA file changed."""
        stamp = self._file_stamp()
        if self._context is not None and stamp in (self._stamp, self._refused):
            return self._context
        try:
            ca_pem = read_ca_file(self._ca_file) if self._ca_file is not None else ""
            context = self._build(ca_pem)
        except (ValueError, ssl.SSLError) as exc:
            if self._context is None:
                raise ValueError(str(exc)) from None
            self._refused = stamp
            log.warning("outbound_ca_file changed but is unusable; the previous CAs stay: %s", exc)
            return self._context
        if self._context is not None:
            log.info("outbound_ca_file changed: new connections trust its CAs")
        self._ca_pem, self._context, self._stamp = ca_pem, context, stamp
        self.generation += 1
        return context

    def client_context(self, chain_pem: str, key_pem: str) -> ssl.SSLContext:
        """The current trust, presenting this certificate chain and key."""
        self.context()
        context = self._build(self._ca_pem)
        # The key goes to an anonymous memory file, never to a disk (see the docstring).
        fd = os.memfd_create("tokensvc-client-certificate", os.MFD_CLOEXEC)
        try:
            os.write(fd, (chain_pem.strip() + "\n" + key_pem.strip() + "\n").encode())
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return context

    def _file_stamp(self) -> tuple[int, ...]:
        if self._ca_file is None:
            return ()
        try:
            st = os.stat(self._ca_file)
        except OSError:
            return (-1,)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    @staticmethod
    def _build(ca_pem: str) -> ssl.SSLContext:
        context = httpcore2.default_ssl_context(_trust_env=False)
        if ca_pem:
            context.load_verify_locations(cadata=ca_pem)
        return context
