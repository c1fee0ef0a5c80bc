"""The ``tokensvc`` command: serve, migrate, keygen, rotate-keys."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from tokensvc import logs
from tokensvc.crypto import generate_key_entry
from tokensvc.errors import (
    ConfigurationError,
    DecryptionError,
    InvalidArgument,
    StoreUnavailable,
)
from tokensvc.settings import Settings, early_logging, load

log = logging.getLogger("tokensvc")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file of settings (env TOKENSVC_CONFIG)")
    parser.add_argument(
        "--data-dir", help="where the SQLite database and key file live (default ./data)"
    )
    parser.add_argument(
        "--database-url",
        help="sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB "
        "(env TOKENSVC_DATABASE_URL; default SQLite in the data dir)",
    )
    parser.add_argument("--key-file", help="key file (default DATA_DIR/keys); or env TOKENSVC_KEYS")
    parser.add_argument("--log-format", choices=("text", "json"))
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokensvc",
        description="OAuth client-credentials tokens for MCP brokers, over gRPC. "
        "Every flag is also an environment variable TOKENSVC_<NAME>.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC service")
    _common(serve)
    serve.add_argument("--listen", help="host:port (default 127.0.0.1:50051)")
    serve.add_argument(
        "--admin-listen",
        help="host:port of a listener of its own for AdminService (default: on --listen); "
        "admin calls then never queue ahead of the brokers' calls",
    )
    serve.add_argument(
        "--allow-insecure-http",
        action="store_true",
        default=None,
        help="accept http:// token endpoints off loopback (never do this in production)",
    )
    serve.add_argument(
        "--egress-refuse",
        help="comma-separated CIDRs outbound requests may not reach, on top of link-local, "
        "metadata and the other addresses always refused (e.g. 10.0.0.0/8,fc00::/7)",
    )
    serve.add_argument("--egress-allow", help="comma-separated CIDRs carved out of --egress-refuse")
    serve.add_argument(
        "--min-forced-refresh-interval",
        type=float,
        help="seconds between refreshes forced by rejected-token reports, per server (default 10)",
    )
    serve.add_argument(
        "--assertion-dir",
        help="directory of platform-issued JWTs that registrations may name as assertion_file "
        "(a projected service-account token volume, SPIFFE JWT-SVIDs)",
    )
    serve.add_argument(
        "--outbound-ca-file",
        help="PEM CA certificates to trust for token endpoints and discovery, on top of the "
        "system's (a private CA); re-read when the file changes",
    )
    serve.add_argument("--grace-period", type=float, help="seconds to drain calls on shutdown")
    serve.add_argument("--tls-cert", help="PEM certificate (chain): serve TLS")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument(
        "--tls-client-ca", help="PEM CA bundle: require client certificates it signed (mTLS)"
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve plaintext off loopback (never in production; logged at every start)",
    )
    serve.add_argument(
        "--metrics-listen",
        help="host:port of a Prometheus /metrics listener (off unless given; e.g. 0.0.0.0:9464)",
    )
    serve.add_argument(
        "--no-reflection",
        dest="reflection",
        action="store_false",
        default=None,
        help="do not serve gRPC server reflection",
    )

    migrate = commands.add_parser("migrate", help="bring the database schema up to date")
    _common(migrate)
    migrate.add_argument("--to", default="head", help="target revision (default head)")

    commands.add_parser("keygen", help="print a new encryption key entry (id:base64key)")

    demo = commands.add_parser(
        "demo",
        help="show the whole flow on loopback: authorization server, MCP server, "
        "tokensvc and a broker calling a tool through rotating tokens",
    )
    demo.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    demo.add_argument("--lifetime", type=float, default=10.0, help="token lifetime in seconds")
    demo.add_argument("--interval", type=float, default=1.0, help="seconds between tool calls")

    bench = commands.add_parser(
        "bench",
        help="measure tokensvc on this machine, each figure beside a baseline from the same run",
    )
    bench.add_argument(
        "measures",
        nargs="*",
        metavar="MEASURE",
        help="hot-path, fan-out, refresh, register, cold-fill, broker-client, replicas "
        "(default: all)",
    )
    bench.add_argument("--quick", action="store_true", help="small and short: a smoke run")
    bench.add_argument(
        "--database-url",
        default="",
        help="an empty PostgreSQL database (postgresql+asyncpg://...) for the replicas measure",
    )
    bench.add_argument(
        "--token-delay",
        type=float,
        metavar="SECONDS",
        help="how long the authorization server takes to answer a token request in the "
        "cold fill: your identity provider's (default 0.2)",
    )

    auth = commands.add_parser(
        "dev-authserver",
        help="run a local OAuth authorization server to try tokensvc with (not for production)",
    )
    auth.add_argument(
        "--listen", default="127.0.0.1:9000", help="host:port (default 127.0.0.1:9000)"
    )
    auth.add_argument("--client-id", default="demo-client")
    auth.add_argument("--client-secret", default="demo-secret")
    auth.add_argument("--scopes", default="read,write", help="scopes the client may have")
    auth.add_argument("--lifetime", type=float, default=300, help="token lifetime in seconds")

    caller = commands.add_parser(
        "create-caller",
        help="create a caller (the first admin key, for instance) and print its key once",
    )
    _common(caller)
    caller.add_argument("--name", required=True)
    caller.add_argument(
        "--role", dest="roles", action="append", choices=("admin", "broker"), required=True
    )
    caller.add_argument(
        "--pattern",
        dest="patterns",
        action="append",
        help="server ids a broker may see (default *)",
    )
    caller.add_argument(
        "--certificate-identity",
        default="",
        help="uri:spiffe://..., dns:NAME or cn:NAME: no key, mTLS",
    )

    rotate = commands.add_parser(
        "rotate-keys", help="re-encrypt every stored secret and token under the newest key"
    )
    _common(rotate)
    return parser


CALLER_ARGS = ("name", "roles", "patterns", "certificate_identity")


def _settings(args: argparse.Namespace) -> Settings:
    skip = ("command", "to", *CALLER_ARGS)
    overrides: dict[str, Any] = {
        k: v for k, v in vars(args).items() if k not in skip and v is not None
    }
    return load(overrides)


async def _create_caller(settings: Settings, args: argparse.Namespace) -> None:
    from tokensvc.registry import Callers
    from tokensvc.server import keyring_for, open_store
    from tokensvc.store.access import AccessStore
    from tokensvc.store.engine import lock_sqlite

    if settings.is_sqlite:
        # A serving process on this SQLite file would not learn of the new
        # caller (no NOTIFY): refuse rather than leave it open by mistake.
        lock = lock_sqlite(settings.effective_database_url)
        if lock is not None:
            os.close(lock)
    store = await open_store(settings, keyring_for(settings))
    try:
        record, key = await Callers(AccessStore(store.transactions), store).create(
            actor="cli:create-caller",
            name=args.name,
            roles=args.roles,
            patterns=args.patterns,
            certificate_identity=args.certificate_identity,
        )
    finally:
        await store.close()
    if key:
        print(key)
        log.info("caller created; its key was printed once", extra={"caller": record.name})
    else:
        log.info("certificate caller created", extra={"caller": record.name})


async def _migrate(settings: Settings, target: str) -> None:
    from tokensvc.store import create_engine, migrate

    engine = create_engine(settings.effective_database_url)
    try:
        before = await migrate.current_revision(engine)
        await migrate.upgrade(engine, target)
        after = await migrate.current_revision(engine)
    finally:
        await engine.dispose()
    log.info("database migrated", extra={"from": before or "empty", "to": after})


async def _rotate(settings: Settings) -> None:
    from tokensvc.server import keyring_for, open_store

    store = await open_store(settings, keyring_for(settings))
    try:
        count = await store.rotate_keys()
        left = await store.key_ids_in_use() - {store.keyring.primary_id}
    finally:
        await store.close()
    log.info(
        "keys rotated",
        extra={"rows_rewritten": count, "primary_key_id": store.keyring.primary_id},
    )
    if left:
        log.warning(
            "some rows are still under older keys (written meanwhile): run rotate-keys again",
            extra={"key_ids": ",".join(sorted(left))},
        )


async def _dev_authserver(args: argparse.Namespace) -> None:
    from tokensvc.demo.authserver import AuthServer, Behaviour
    from tokensvc.server import until_signalled

    host, _, port = args.listen.rpartition(":")
    server = AuthServer(host=host, port=int(port), behaviour=Behaviour(lifetime=args.lifetime))
    server.add_client(args.client_id, args.client_secret, scopes=args.scopes.split(","))
    async with server:
        log.info(
            "development authorization server ready",
            extra={"token_endpoint": server.token_endpoint, "client_id": args.client_id},
        )
        await until_signalled()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keygen":
        print(generate_key_entry())
        return 0
    if args.command == "demo":
        from tokensvc.demo.run import run_demo

        logs.configure("error")  # the demo prints what matters itself
        try:
            return asyncio.run(run_demo(args.duration, args.lifetime, args.interval))
        except KeyboardInterrupt:
            return 130
    if args.command == "bench":
        from tokensvc.bench import MEASURES, run

        unknown = set(args.measures) - set(MEASURES)
        if unknown:
            print(f"unknown measure {sorted(unknown)[0]!r}: use {', '.join(MEASURES)}")
            return 2
        if args.token_delay is not None and not 0 <= args.token_delay <= 60:
            print("--token-delay must be between 0 and 60 seconds")
            return 2
        logs.configure("error")  # the table is the output
        figures = asyncio.run(run(args.measures, args.quick, args.database_url, args.token_delay))
        return 0 if all(figure.met for figure in figures) else 1
    if args.command == "dev-authserver":
        logs.configure()
        asyncio.run(_dev_authserver(args))
        return 0
    logs.configure(*early_logging(vars(args)))
    try:
        settings = _settings(args)
        logs.configure(settings.log_level, settings.log_format)
        if args.command == "serve":
            from tokensvc.server import serve

            asyncio.run(serve(settings))
        elif args.command == "migrate":
            asyncio.run(_migrate(settings, args.to))
        elif args.command == "create-caller":
            asyncio.run(_create_caller(settings, args))
        elif args.command == "rotate-keys":
            asyncio.run(_rotate(settings))
    except (ConfigurationError, DecryptionError, StoreUnavailable, InvalidArgument) as exc:
        log.error("cannot start: " + exc.message)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
