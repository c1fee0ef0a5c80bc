"""Every outbound HTTP request of tokensvc, and where it may go.

The only part of the service that imports httpx2. Token requests (through
authlib, handed our transport), discovery GETs with each redirect hop, and
TestServer's MCP calls (the MCP SDK is handed a client built here) all leave
through :meth:`Egress.transport`. Its modules, one job each:

- policy.py: where requests may go (the URL syntax, the addresses always
  refused, ``egress_refuse`` and ``egress_allow``, plain http to loopback only);
- backend.py: the network backend that resolves a host once per connection,
  checks every address and connects to a checked one (no DNS rebinding);
- stream.py: the connections themselves, on asyncio's transports (an idle
  connection knows from memory whether its server closed it);
- pools.py: the transport, a connection pool per scheme and client
  certificate presented (RFC 8705), bounded and retired when trust changes;
- limits.py: the response size cap, and no content encoding;
- facade.py: :class:`Egress`, the clients and transports the rest of the
  service uses, and discovery's GET.

TLS trust (the system's CAs and the operator's ``outbound_ca_file``, re-read
when it changes) and client certificates are built in outbound_tls.py.
"""

from tokensvc.egress.facade import (
    Answer,
    Egress,
    HTTPError,
    Request,
    Response,
    failure_words,
)
from tokensvc.egress.limits import ResponseRefused
from tokensvc.egress.policy import (
    MAX_URL,
    UrlPolicy,
    embedded_ipv4,
    is_loopback,
    parse_networks,
)
from tokensvc.egress.pools import CLIENT_CERTIFICATE

__all__ = [
    "CLIENT_CERTIFICATE",
    "MAX_URL",
    "Answer",
    "Egress",
    "HTTPError",
    "Request",
    "Response",
    "ResponseRefused",
    "UrlPolicy",
    "embedded_ipv4",
    "failure_words",
    "is_loopback",
    "parse_networks",
]
