"""Every outbound HTTP request of tokensvc, and where it may go.

The only part of the service that imports httpx2 and h11. Token requests
(authlib's body, sent by :meth:`Egress.poster`) leave on connections of
their own; discovery GETs with each redirect hop, and TestServer's MCP calls
(the MCP SDK is handed a client built here) leave through
:meth:`Egress.transport`. Both connect through the same pinned backend. Its
modules, one job each:

- policy.py: where requests may go (the URL syntax, the addresses always
  refused, ``egress_refuse`` and ``egress_allow``, plain http to loopback only);
- backend.py: the network backend that resolves a host once per connection,
  checks every address and connects to a checked one (no DNS rebinding);
- stream.py: the connections themselves, on asyncio's transports (an idle
  connection knows from memory whether its server closed it);
- http11.py: token requests, POSTs on kept-alive HTTP/1.1 connections (h11)
  per destination and client certificate presented, without httpx2's models;
- pools.py: the transport, a connection pool per scheme, retired when trust
  changes;
- limits.py: the response size cap, and no content encoding (for both);
- facade.py: :class:`Egress`, the clients and transports the rest of the
  service uses, and discovery's GET.

TLS trust (the system's CAs and the operator's ``outbound_ca_file``, re-read
when it changes) and client certificates are built in outbound_tls.py.
"""

from tokensvc.egress.facade import (
    NETWORK_ERRORS,
    Egress,
    Request,
    Response,
    failure_words,
)
from tokensvc.egress.http11 import Answer
from tokensvc.egress.limits import ResponseRefused
from tokensvc.egress.policy import (
    MAX_URL,
    UrlPolicy,
    embedded_ipv4,
    is_loopback,
    parse_networks,
)

__all__ = [
    "MAX_URL",
    "NETWORK_ERRORS",
    "Answer",
    "Egress",
    "Request",
    "Response",
    "ResponseRefused",
    "UrlPolicy",
    "embedded_ipv4",
    "failure_words",
    "is_loopback",
    "parse_networks",
]
