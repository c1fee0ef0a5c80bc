"""The process: CLI, migrations, keys at start, health and graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import inspect, text

from tokensvc.crypto import KeyRing, generate_key_entry
from tokensvc.demo.authserver import AuthServer
from tokensvc.store import create_engine, migrate
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc

from replicas import TOKENSVC, run_tokensvc, tokensvc_env
from support import Harness, create_pg_database, drop_pg_database, running_service, sha


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``tokensvc *args`` with no TOKENSVC_* variable of this environment, but ``env``."""
    return await run_tokensvc(*args, env={**tokensvc_env(), **(env or {})})


async def test_keygen_prints_a_usable_key() -> None:
    code, out = await run("keygen")
    assert code == 0
    assert KeyRing.parse(out.strip()).primary_id == out.split(":")[0]


@pytest.mark.parametrize("command", ["serve", "migrate", "keygen", "rotate-keys", "dev-authserver"])
async def test_every_command_has_help(command: str) -> None:
    code, out = await run(command, "--help")
    assert code == 0 and "usage: tokensvc" in out


async def test_migrations_go_up_and_down(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert {"servers", "tokens", "audit_events", "alembic_version"} <= tables
        assert await migrate.current_revision(engine) == migrate.head_revision()
        await migrate.downgrade(engine, "base")
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert tables <= {"alembic_version"}
        assert await migrate.current_revision(engine) is None
    finally:
        await engine.dispose()


async def test_migration_0005_types_the_certificate_identities_stored_before_it(
    database_url: str,
) -> None:
    engine = create_engine(database_url)
    untyped = {"a": "spiffe://example.org/a", "b": "b.example.org", "c": "broker-c"}
    try:
        await migrate.upgrade(engine, "0004")
        async with engine.begin() as conn:
            for caller_id, identity in untyped.items():
                await conn.execute(
                    text(
                        "INSERT INTO callers (id, name, kind, identity, roles, server_patterns,"
                        " create_time) VALUES (:id, :id, 'certificate', :identity, '[\"broker\"]',"
                        " '[\"*\"]', '2026-01-01 00:00:00')"
                    ),
                    {"id": caller_id, "identity": identity},
                )
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            rows = dict((await conn.execute(text("SELECT id, identity FROM callers"))).all())
        assert rows == {
            "a": "uri:spiffe://example.org/a",
            "b": "dns:b.example.org",
            "c": "cn:broker-c",
        }
        await migrate.downgrade(engine, "0004")
        async with engine.connect() as conn:
            rows = dict((await conn.execute(text("SELECT id, identity FROM callers"))).all())
        assert rows == untyped
    finally:
        await engine.dispose()


async def test_serve_refuses_a_postgresql_database_that_is_behind_then_migrate_fixes_it(
    tmp_path: Path,
) -> None:
    url = await create_pg_database()
    env = {"TOKENSVC_DATABASE_URL": url, "TOKENSVC_DATA_DIR": str(tmp_path)}
    try:
        code, out = await run("serve", "--listen", "127.0.0.1:0", env=env)
        assert code == 2 and "tokensvc migrate" in out, out
        code, out = await run("migrate", env=env)
        assert code == 0 and "database migrated" in out, out
        process = await asyncio.create_subprocess_exec(
            TOKENSVC,
            "serve",
            "--listen",
            "127.0.0.1:0",
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **env},
        )
        assert process.stderr is not None
        while "tokensvc serving" not in (line := (await process.stderr.readline()).decode()):
            assert line, "serve exited early"
        process.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(process.stderr.read(), 30)).decode()
        assert await process.wait() == 0
        assert "shutting down" in rest and "tokensvc stopped" in rest
    finally:
        await drop_pg_database(url)


async def test_serve_refuses_data_under_a_key_it_does_not_have(
    tmp_path: Path, auth: AuthServer
) -> None:
    first = generate_key_entry()
    async with running_service(tmp_path, auth, keys=first) as h:
        await h.register()
        # Wait for the first token: a fetch cancelled by the stop while it was
        # writing could leave SQLite locked for a moment, and the serve below
        # would fail on the lock (exit 1) instead of on the key (exit 2).
        await h.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
    before = (tmp_path / "tokensvc.db").read_bytes()
    code, out = await run(
        "serve",
        "--data-dir",
        str(tmp_path),
        "--listen",
        "127.0.0.1:0",
        env={"TOKENSVC_KEYS": generate_key_entry()},
    )
    assert code == 2
    assert first.split(":")[0] in out and "not configured" in out
    assert (tmp_path / "tokensvc.db").read_bytes() == before


async def test_a_taken_port_is_refused_clearly(tmp_path: Path, auth: AuthServer) -> None:
    async with running_service(tmp_path / "a", auth) as h:
        code, out = await run("serve", "--data-dir", str(tmp_path / "b"), "--listen", h.target)
    assert code == 2 and "cannot listen" in out


async def services_listed(channel: grpc.aio.Channel) -> set[str]:
    """The services a listener's reflection lists."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for response in stub.ServerReflectionInfo(iter([request])):
        return {s.name for s in response.list_services_response.service}
    raise AssertionError("no reflection response")


async def test_admin_listen_serves_admin_service_there_and_everything_else_on_listen(
    tmp_path: Path, auth: AuthServer
) -> None:
    async with running_service(tmp_path, auth, admin_listen="127.0.0.1:0") as h:
        assert h.service.admin_port not in (0, h.service.port)
        await h.register()  # on the admin listener
        token = await h.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
        assert token.access_token == auth.issued[0]
        for wrong in (
            pb_grpc.AdminServiceStub(h.channel).ListServers(pb.ListServersRequest()),
            pb_grpc.TokenServiceStub(h.admin_channel).GetToken(
                pb.GetTokenRequest(server_id="alpha")
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await wrong
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        for channel in (h.channel, h.admin_channel):
            health = health_pb2_grpc.HealthStub(channel)
            checked = await health.Check(health_pb2.HealthCheckRequest())
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
        everyday = {"tokensvc.v1.TokenService", "envoy.service.secret.v3.SecretDiscoveryService"}
        common = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
        assert await services_listed(h.channel) == everyday | common
        assert await services_listed(h.admin_channel) == {"tokensvc.v1.AdminService"} | common


async def test_health_is_serving_then_not_serving_on_shutdown_and_calls_drain(
    tmp_path: Path, auth: AuthServer
) -> None:
    async with running_service(tmp_path, auth) as h:
        await h.register()
        health = health_pb2_grpc.HealthStub(h.channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="tokensvc.v1.TokenService"))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        first = await h.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
        gate = asyncio.Event()
        auth.behaviour.gate = gate
        # Reporting the token rejected makes this call's own token request, so
        # once that request arrives, the call is in progress in tokensvc.
        report = pb.GetTokenRequest(
            server_id="alpha", rejected_token_sha256=sha(first.access_token)
        )
        in_flight = asyncio.ensure_future(h.tokens.GetToken(report))
        await auth.wait_for_requests(2)
        stopping = asyncio.ensure_future(h.service.stop(grace=30))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # an open stream would hold the shutdown for the whole grace
        gate.set()
        token = await in_flight  # finished within the grace period
        assert token.access_token == auth.issued[1]
        await stopping
        with pytest.raises(grpc.aio.AioRpcError):
            await h.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"), timeout=2)


async def test_a_config_file_and_the_environment_are_read_with_flags_winning(
    tmp_path: Path,
) -> None:
    from tokensvc.settings import load

    config = tmp_path / "tokensvc.toml"
    config.write_text('listen = "127.0.0.1:7000"\nhttp_timeout = 3\nlog_format = "json"\n')
    settings = load(
        {"config": str(config), "listen": "127.0.0.1:7001"},
        {"TOKENSVC_HTTP_TIMEOUT": "4", "TOKENSVC_ALLOW_INSECURE_HTTP": "true"},
    )
    assert settings.listen == "127.0.0.1:7001"
    assert settings.http_timeout == 4.0 and settings.allow_insecure_http
    assert settings.log_format == "json"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TOKENSVC_LISTEN": "nowhere"}, "host:port"),
        ({"TOKENSVC_HTTP_TIMEOUT": "soon"}, "http_timeout"),
        ({"TOKENSVC_DATABASE_URL": "mysql://x"}, "database_url"),
        ({"TOKENSVC_ALLOW_INSECURE_HTTP": "maybe"}, "allow_insecure_http"),
        ({"TOKENSVC_METRICS_LISTEN": "9464"}, "metrics_listen '9464' is not host:port"),
        ({"TOKENSVC_ADMIN_LISTEN": "50052"}, "admin_listen '50052' is not host:port"),
        (
            {"TOKENSVC_ADMIN_LISTEN": "127.0.0.1:50051"},
            "admin_listen 127.0.0.1:50051 is also listen",
        ),
        (
            {"TOKENSVC_ADMIN_LISTEN": "0.0.0.0:50052"},
            "admin_listen 0.0.0.0:50052 is not a loopback address and no TLS is configured",
        ),
        ({"TOKENSVC_METRICS_PER_SERVER": "some"}, "metrics_per_server"),
        (
            {"TOKENSVC_OUTBOUND_CA_FILE": "/nonexistent/ca.pem"},
            "outbound_ca_file: .* cannot be read",
        ),
        ({"TOKENSVC_OUTBOUND_CA_FILE": __file__}, "outbound_ca_file: .* holds no PEM certificates"),
    ],
)
def test_bad_settings_are_refused_before_binding(environ: dict[str, str], message: str) -> None:
    from tokensvc.errors import ConfigurationError
    from tokensvc.settings import load

    with pytest.raises(ConfigurationError, match=message):
        load({}, environ)


@pytest.mark.parametrize("given", ["argument", "settings"])
async def test_the_container_healthcheck_reports_serving(harness: Harness, given: str) -> None:
    """Given no address, it follows the listen setting, as the image's HEALTHCHECK does."""
    listen = f"0.0.0.0:{harness.service.port}"  # a wildcard, as in the image
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokensvc.healthcheck",
        *([harness.target] if given == "argument" else []),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "TOKENSVC_LISTEN": listen, "TOKENSVC_INSECURE": "1"},
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0 and out.decode().strip() == "SERVING"


async def test_the_liveness_check_passes_while_not_serving_and_the_readiness_check_fails(
    harness: Harness,
) -> None:
    """As while the database is down: alive (tokens served from memory), not ready."""
    await harness.service._set_health(False)
    for flags, code in (([], 1), (["--alive"], 0)):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tokensvc.healthcheck",
            *flags,
            harness.target,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 30)
        assert (process.returncode, out.decode().strip()) == (code, "NOT_SERVING")


async def test_a_start_up_error_is_logged_in_the_configured_format(tmp_path: Path) -> None:
    """The image sets TOKENSVC_LOG_FORMAT=json: its refusals must be JSON too."""
    for env in (
        {"TOKENSVC_LISTEN": "0.0.0.0:0"},  # off loopback with no TLS: refused
        {"TOKENSVC_LISTEN": "0.0.0.0:0", "TOKENSVC_HTTP_TIMEOUT": "soon"},  # unreadable
    ):
        code, out = await run(
            "serve",
            "--data-dir",
            str(tmp_path),
            env={**env, "TOKENSVC_LOG_FORMAT": "json"},
        )
        assert code == 2
        (line,) = out.splitlines()
        entry = json.loads(line)
        assert entry["level"] == "error" and entry["msg"].startswith("cannot start: ")
