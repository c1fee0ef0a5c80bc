"""AdminService over real gRPC: register, read, page, delete, and every input rule."""

from __future__ import annotations

import base64
from pathlib import Path

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, select

from tokensvc.demo.authserver import AuthServer
from tokensvc.store.tables import audit_events, servers
from tokensvc.v1 import tokensvc_pb2 as pb

from support import SECRET, Harness, error_info, running_service


async def test_a_registered_server_reads_back_without_its_secret(harness: Harness) -> None:
    created = await harness.register(scopes=["read"], audience="api://mcp")
    assert created.revision == 1 and created.credential_set
    fetched = await harness.admin.GetServer(pb.GetServerRequest(id="alpha"))
    assert fetched.token_endpoint == harness.auth.token_endpoint
    assert list(fetched.scopes) == ["read"] and fetched.audience == "api://mcp"
    assert fetched.auth_method == pb.CLIENT_AUTH_METHOD_UNSPECIFIED
    assert fetched.effective_auth_method == pb.CLIENT_AUTH_METHOD_CLIENT_SECRET_BASIC
    assert SECRET not in str(MessageToDict(fetched)) and SECRET.encode() not in (
        fetched.SerializeToString()
    )


async def test_registering_again_unchanged_keeps_the_revision(harness: Harness) -> None:
    first = await harness.register()
    again = await harness.register()
    without_secret = await harness.register(secret=None)
    assert first.revision == again.revision == without_secret.revision == 1
    changed = await harness.register(scopes=["write"])
    assert changed.revision == 2


async def test_a_stale_expected_revision_is_aborted(harness: Harness) -> None:
    await harness.register()
    request = pb.RegisterServerRequest(
        server=(await harness.admin.GetServer(pb.GetServerRequest(id="alpha"))),
        expected_revision=5,
    )
    request.server.scopes.append("write")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.admin.RegisterServer(request)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert error_info(caught.value).reason == "REVISION_MISMATCH"
    assert error_info(caught.value).metadata["revision"] == "1"
    request.expected_revision = 1
    assert (await harness.admin.RegisterServer(request)).revision == 2


async def test_creating_without_a_secret_names_the_field(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.register(secret=None)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "client_secret"


async def test_servers_are_listed_page_by_page(harness: Harness) -> None:
    names = [f"srv-{i:02d}" for i in range(7)]
    for name in reversed(names):
        await harness.register(name)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await harness.admin.ListServers(pb.ListServersRequest(page_size=3, page_token=token))
        seen += [s.id for s in page.servers]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == names and pages == 3


async def test_a_forged_page_token_is_refused(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.admin.ListServers(pb.ListServersRequest(page_token="garbage"))
    assert error_info(caught.value).metadata["field"] == "page_token"


async def test_deleting_removes_the_server_and_unknown_ids_are_not_found(harness: Harness) -> None:
    await harness.register()
    await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
    await harness.admin.DeleteServer(pb.DeleteServerRequest(id="alpha"))
    for call in (
        harness.admin.GetServer(pb.GetServerRequest(id="alpha")),
        harness.admin.DeleteServer(pb.DeleteServerRequest(id="alpha")),
        harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        info = error_info(caught.value)
        assert (info.domain, info.reason) == ("tokensvc", "SERVER_NOT_FOUND")


def _token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


BAD_INPUTS = [
    ("server.id", {"id": "Upper"}, "a-z"),
    ("server.id", {"id": "-lead"}, "starting with a letter or digit"),
    ("server.id", {"id": "x" * 64}, "1 to 63"),
    ("server.token_endpoint", {"token_endpoint": "http://192.0.2.10/token"}, "https"),
    ("server.token_endpoint", {"token_endpoint": "ftp://127.0.0.1/token"}, "https"),
    ("server.token_endpoint", {"token_endpoint": "not a url"}, "a space"),
    ("server.token_endpoint", {"token_endpoint": "noscheme.example/token"}, "https"),
    ("server.token_endpoint", {"token_endpoint": "https://as.example.com/t\r\nX: y"}, "U+000D"),
    ("server.token_endpoint", {"token_endpoint": "https://as.exa\x00mple.com/t"}, "U+0000"),
    ("server.token_endpoint", {"token_endpoint": "https://as.\texample.com/t"}, "U+0009"),
    ("server.token_endpoint", {"token_endpoint": "https://as.example.com/a b"}, "a space"),
    ("server.token_endpoint", {"token_endpoint": " https://as.example.com/t"}, "a space"),
    ("server.token_endpoint", {"token_endpoint": "https://as.example.com/t#"}, "#fragment"),
    ("server.token_endpoint", {"token_endpoint": "https://as.example.com:0/t"}, "port 0"),
    ("server.token_endpoint", {"token_endpoint": "https://as.example.com\\@x/t"}, "U+005C"),
    ("server.mcp_url", {"mcp_url": "https://mcp.example.com/\u2028"}, "U+2028"),
    ("server.token_endpoint", {"token_endpoint": "https://169.254.169.254/token"}, "metadata"),
    ("server.token_endpoint", {"token_endpoint": "https://[fd00:ec2::254]/token"}, "metadata"),
    ("server.token_endpoint", {"token_endpoint": "https://[fe80::1]/token"}, "link-local"),
    ("server.token_endpoint", {"token_endpoint": "https://0.0.0.0/token"}, "unspecified"),
    ("server.token_endpoint", {"token_endpoint": "https://u:p@as.example.com/t"}, "credentials"),
    ("server.token_endpoint", {"token_endpoint": "https://x.invalid/token"}, "does not resolve"),
    ("server.token_endpoint", {"token_endpoint": "https://a.example/" + "x" * 2100}, "2048"),
    ("server.mcp_url", {"mcp_url": ""}, "required"),
    ("server.mcp_url", {"mcp_url": "http://169.254.169.254/latest"}, "metadata"),
    ("server.client_id", {"client_id": ""}, "required"),
    ("server.client_id", {"client_id": "a\nb"}, "control"),
    ("server.scopes[1]", {"scopes": ["ok", "two words"]}, "scope-token"),
    ("server.scopes", {"scopes": [f"s{i}" for i in range(65)]}, "64"),
    (
        "server.extra_token_params['grant_type']",
        {"extra_token_params": {"grant_type": "x"}},
        "set by tokensvc",
    ),
    ("server.extra_token_params['b d']", {"extra_token_params": {"b d": "x"}}, "keys are"),
    ("server.resource", {"resource": "https://169.254.169.254/"}, "metadata"),
]


@pytest.mark.parametrize(
    ("field", "change", "hint"), BAD_INPUTS, ids=[b[0] + ":" + b[2] for b in BAD_INPUTS]
)
async def test_bad_registrations_name_the_field_and_change_nothing(
    harness: Harness, field: str, change: dict[str, object], hint: str
) -> None:
    await harness.register("keep")
    await harness.tokens.GetToken(pb.GetTokenRequest(server_id="keep"))  # settles its status
    before = await _snapshot(harness)
    server_id = str(change.pop("id", "alpha"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.register(server_id, **change)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == field
    assert field in (caught.value.details() or "") and hint in (caught.value.details() or "")
    assert await _snapshot(harness) == before


@pytest.mark.parametrize(
    ("secret", "field", "hint"),
    [("", "client_secret", "empty"), ("x" * 5000, "client_secret", "4096")],
)
async def test_bad_secrets_are_refused_without_echoing_them(
    harness: Harness, secret: str, field: str, hint: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.register(secret=secret)
    assert error_info(caught.value).metadata["field"] == field
    assert hint in (caught.value.details() or "")
    if secret:
        assert secret not in (caught.value.details() or "")


async def test_a_private_key_that_is_not_one_is_refused_without_echoing_it(
    harness: Harness,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.register("pk", None, private_key_pem="-----BEGIN PRIVATE KEY-----\n...")
    assert error_info(caught.value).metadata["field"] == "private_key_pem"
    assert "-----BEGIN" not in (caught.value.details() or "")


async def test_plain_http_off_loopback_needs_the_explicit_setting(
    tmp_path: Path, auth: AuthServer
) -> None:
    # 192.0.2.0/24 is reserved for documentation: registered here, never contacted.
    async with running_service(tmp_path / "d", auth, allow_insecure_http=True) as h:
        created = await h.register(token_endpoint="http://192.0.2.10/token")
        assert created.revision == 1


async def _snapshot(harness: Harness) -> tuple[object, ...]:
    store = harness.service.store
    assert store is not None
    async with store.engine.connect() as conn:
        rows = (await conn.execute(select(servers).order_by(servers.c.id))).all()
        audits = (await conn.execute(select(func.count()).select_from(audit_events))).scalar()
    return (tuple(tuple(r) for r in rows), audits)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (pb.ListAuditEventsRequest(start_time=Timestamp(seconds=2**62)), "start_time"),
        (pb.ListAuditEventsRequest(end_time=Timestamp(seconds=-(2**62))), "end_time"),
        (pb.ListAuditEventsRequest(page_token="garbage!"), "page_token"),
        (pb.ListAuditEventsRequest(page_token=_token("v1:abc")), "page_token"),
        (pb.ListAuditEventsRequest(page_token=_token("v1:" + "9" * 40)), "page_token"),
        (pb.ListServersRequest(page_token="garbage!"), "page_token"),
    ],
    ids=["start_time", "end_time", "garbage", "not-a-number", "huge", "servers-garbage"],
)
async def test_out_of_range_times_and_page_tokens_are_invalid_arguments(
    harness: Harness, query: object, field: str
) -> None:
    call = (
        harness.admin.ListAuditEvents
        if isinstance(query, pb.ListAuditEventsRequest)
        else harness.admin.ListServers
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(query)  # type: ignore[operator]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == field
