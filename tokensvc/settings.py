"""Every setting of tokensvc, in one frozen object, validated before the server binds.

Sources, strongest first: command-line flags, ``TOKENSVC_*`` environment
variables, a TOML file (``--config``/``TOKENSVC_CONFIG``), defaults. This is the
only module that reads the environment.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from tokensvc.egress import UrlPolicy, parse_networks
from tokensvc.errors import ConfigurationError
from tokensvc.outbound_tls import read_ca_file
from tokensvc.policy import RefreshPolicy
from tokensvc.token import DEFAULT_MIN_VALID_FOR


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    # AdminService on a listener of its own (host:port), off `listen`: admin
    # calls then never queue ahead of the brokers' calls (grpc.aio accepts a
    # listener's calls one at a time, in arrival order), and a firewall can
    # keep it apart. Empty: on `listen`, with everything else.
    admin_listen: str = ""
    data_dir: Path = Path("data")
    # Default: SQLite in data_dir. PostgreSQL: postgresql+asyncpg://user@host/db
    database_url: str = ""
    # "id:base64key" entries, newest last. Default: the key file.
    keys: str = ""
    # Default: data_dir/keys, created with mode 0600 on first start.
    key_file: Path | None = None
    allow_insecure_http: bool = False
    # Comma-separated CIDRs outbound requests may not go to, on top of the
    # addresses always refused (e.g. 10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7),
    # and CIDRs carved out of those again.
    egress_refuse: str = ""
    egress_allow: str = ""
    # Platform-issued JWTs (projected service-account tokens, JWT-SVIDs) that
    # registrations may name as their assertion_file. None: such registrations
    # are refused.
    assertion_dir: Path | None = None
    # PEM CA certificates trusted for outbound TLS (token endpoints, discovery,
    # TestServer) on top of the system's; re-read when the file changes.
    outbound_ca_file: Path | None = None
    http_timeout: float = 10.0
    # Token requests the schedule (first fetches after registration, and
    # refreshes) has in flight at once; a GetToken that must wait for a token
    # never waits for one of these slots.
    fetch_concurrency: int = 32
    max_response_bytes: int = 65536
    default_token_lifetime: float = 300.0
    min_valid_for: float = DEFAULT_MIN_VALID_FOR.total_seconds()
    # At most one refresh per server in this many seconds because a broker
    # reported its token rejected; other reports get the current token.
    min_forced_refresh_interval: float = 10.0
    grace_period: float = 10.0
    refresh_fraction: float = 0.5
    refresh_jitter: float = 0.05
    backoff_cap: float = 30.0
    permanent_backoff_cap: float = 3600.0
    log_format: str = "text"
    log_level: str = "info"
    # TLS: a certificate and key serve TLS; a client CA requires client
    # certificates signed by it (mTLS). Files are re-read when they change.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Listen off loopback without TLS anyway (never in production).
    insecure: bool = False
    reflection: bool = True
    audit_retention_days: float = 90.0
    # Prometheus /metrics on its own listener (host:port); off when empty.
    metrics_listen: str = ""
    # Off: no server_id label, for fleets too large for a series per server.
    metrics_per_server: bool = True
    # PostgreSQL replicas write a heartbeat this often (seconds); one whose last
    # heartbeat is older than replica_ttl is gone, and its servers move to the others.
    replica_heartbeat_interval: float = 2.0
    replica_ttl: float = 6.0

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'tokensvc.db'}"

    @property
    def effective_key_file(self) -> Path:
        return self.key_file or self.data_dir / "keys"

    @property
    def listeners(self) -> tuple[tuple[str, str], ...]:
        """Each gRPC listener as (setting, address)."""
        admin = (("admin_listen", self.admin_listen),) if self.admin_listen else ()
        return (("listen", self.listen), *admin)

    @property
    def listens_on_loopback(self) -> bool:
        """Every gRPC listener is on a loopback address."""
        return all(_loopback(address) for _, address in self.listeners)

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")

    @property
    def default_min_valid_for(self) -> timedelta:
        return timedelta(seconds=self.min_valid_for)

    @property
    def refresh_policy(self) -> RefreshPolicy:
        return RefreshPolicy(
            fraction=self.refresh_fraction,
            jitter=self.refresh_jitter,
            backoff_cap=timedelta(seconds=self.backoff_cap),
            permanent_backoff_base=min(
                timedelta(seconds=60), timedelta(seconds=self.permanent_backoff_cap)
            ),
            permanent_backoff_cap=timedelta(seconds=self.permanent_backoff_cap),
        )

    @property
    def heartbeat_interval(self) -> timedelta:
        return timedelta(seconds=self.replica_heartbeat_interval)

    @property
    def heartbeat_ttl(self) -> timedelta:
        return timedelta(seconds=self.replica_ttl)

    @property
    def url_policy(self) -> UrlPolicy:
        return UrlPolicy(
            allow_insecure_http=self.allow_insecure_http,
            refuse=parse_networks(self.egress_refuse, "egress_refuse"),
            allow=parse_networks(self.egress_allow, "egress_allow"),
        )

    @property
    def default_lifetime(self) -> timedelta:
        return timedelta(seconds=self.default_token_lifetime)

    @property
    def health_target(self) -> str:
        """Where a health check on this host reaches the listener."""
        host, _, port = self.listen.rpartition(":")
        wildcard = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}  # noqa: S104 (not a bind)
        return f"{wildcard.get(host, host)}:{port}"

    def validate(self) -> Settings:
        _check_address("listen", self.listen, "127.0.0.1:50051 or [::]:50051")
        if self.admin_listen:
            _check_address("admin_listen", self.admin_listen, "127.0.0.1:50052")
            if self.admin_listen == self.listen and not self.listen.endswith(":0"):
                raise ConfigurationError(
                    f"admin_listen {self.admin_listen} is also listen: give another port, "
                    "or leave admin_listen empty to serve AdminService on listen"
                )
        if self.metrics_listen:
            _check_address("metrics_listen", self.metrics_listen, "0.0.0.0:9464")
        if self.database_url and not self.database_url.startswith(
            ("sqlite+aiosqlite://", "postgresql+asyncpg://")
        ):
            raise ConfigurationError(
                "database_url must start with sqlite+aiosqlite:// or postgresql+asyncpg://"
            )
        for name in ("http_timeout", "default_token_lifetime", "grace_period"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be positive")
        if not 0.05 <= self.refresh_fraction <= 0.95:
            raise ConfigurationError("refresh_fraction must be between 0.05 and 0.95")
        if not 0 <= self.refresh_jitter <= 0.2:
            raise ConfigurationError("refresh_jitter must be between 0 and 0.2")
        if not 1 <= self.backoff_cap <= self.permanent_backoff_cap:
            raise ConfigurationError(
                "backoff_cap must be at least 1 and at most permanent_backoff_cap"
            )
        if self.min_valid_for < 0:
            raise ConfigurationError("min_valid_for must not be negative")
        if not 0 <= self.min_forced_refresh_interval <= 3600:
            raise ConfigurationError("min_forced_refresh_interval must be between 0 and 3600 s")
        if not 0.1 <= self.replica_heartbeat_interval <= 60:
            raise ConfigurationError("replica_heartbeat_interval must be between 0.1 and 60 s")
        if not 2 * self.replica_heartbeat_interval <= self.replica_ttl <= 600:
            raise ConfigurationError(
                "replica_ttl must be at least twice replica_heartbeat_interval and at most 600 s"
            )
        if not 1 <= self.fetch_concurrency <= 1024:
            raise ConfigurationError("fetch_concurrency must be between 1 and 1024")
        if not 1024 <= self.max_response_bytes <= 16 * 1024 * 1024:
            raise ConfigurationError("max_response_bytes must be between 1024 and 16777216")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigurationError("tls_cert and tls_key go together: give both, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigurationError("tls_client_ca (mTLS) needs tls_cert and tls_key too")
        if self.assertion_dir is not None and not Path(self.assertion_dir).is_dir():
            raise ConfigurationError(f"assertion_dir: {self.assertion_dir} is not a directory")
        if self.outbound_ca_file is not None:
            try:
                read_ca_file(self.outbound_ca_file)
            except ValueError as exc:
                raise ConfigurationError(f"outbound_ca_file: {exc}") from None
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigurationError(f"{name}: {path} is not a readable file")
        for name, address in self.listeners:
            if not self.tls_cert and not self.insecure and not _loopback(address):
                raise ConfigurationError(
                    f"{name} {address} is not a loopback address and no TLS is configured: "
                    "give --tls-cert and --tls-key (and --tls-client-ca for mTLS), or "
                    "--insecure to serve plaintext anyway"
                )
        try:
            self.url_policy  # noqa: B018 (parses the CIDR lists)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        if self.audit_retention_days <= 0:
            raise ConfigurationError("audit_retention_days must be positive")
        if self.log_format not in LOG_FORMATS:
            raise ConfigurationError("log_format must be text or json")
        if self.log_level not in LOG_LEVELS:
            raise ConfigurationError("log_level must be debug, info, warning or error")
        return self


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_address(name: str, value: str, example: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigurationError(f"{name} {value!r} is not host:port (e.g. {example})")


FIELDS = {f.name: f for f in fields(Settings)}
ENV_PREFIX = "TOKENSVC_"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def early_logging(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """The log level and format from flags and environment alone, where valid,
    for the errors that stop the settings from loading."""
    env = os.environ if environ is None else environ

    def pick(name: str, allowed: tuple[str, ...]) -> str:
        value = (overrides or {}).get(name) or env.get(ENV_PREFIX + name.upper(), "")
        return value if value in allowed else getattr(Settings(), name)

    return pick("log_level", LOG_LEVELS), pick("log_format", LOG_FORMATS)


def _coerce(name: str, value: Any) -> Any:
    default = getattr(Settings(), name)
    kind = FIELDS[name].type
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                raise ValueError(value)
            return text in ("1", "true", "yes", "on")
        if isinstance(default, float):
            return float(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, Path) or "Path" in str(kind):
            return Path(value) if value not in (None, "") else None
        return str(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"setting {name}: {str(value)[:60]!r} is not valid") from None


def load(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Builds the settings from file, environment and overrides (flags; None = unset)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config = (overrides or {}).get("config") or env.get(ENV_PREFIX + "CONFIG")
    if config:
        try:
            with open(config, "rb") as handle:
                data = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"cannot read config file {config}: {exc}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in FIELDS:
                raise ConfigurationError(f"config file {config}: unknown setting {key!r}")
            values[name] = value
    for name in FIELDS:
        if ENV_PREFIX + name.upper() in env:
            values[name] = env[ENV_PREFIX + name.upper()]
    for name, value in (overrides or {}).items():
        if name in FIELDS and value is not None:
            values[name] = value
    settings = replace(Settings(), **{k: _coerce(k, v) for k, v in values.items()})
    if settings.data_dir is None:
        raise ConfigurationError("data_dir must not be empty")
    return settings.validate()


@dataclass(frozen=True, slots=True)
class HealthcheckFiles:
    """What ``python -m tokensvc.healthcheck`` presents and trusts: the server's
    certificate (``TOKENSVC_TLS_CERT``) and, for mTLS, a client certificate and
    key (``TOKENSVC_HEALTHCHECK_CERT``, ``TOKENSVC_HEALTHCHECK_KEY``)."""

    tls_cert: str
    client_cert: str
    client_key: str


def healthcheck_files(environ: Mapping[str, str] | None = None) -> HealthcheckFiles:
    env = os.environ if environ is None else environ
    return HealthcheckFiles(
        env.get(ENV_PREFIX + "TLS_CERT", ""),
        env.get(ENV_PREFIX + "HEALTHCHECK_CERT", ""),
        env.get(ENV_PREFIX + "HEALTHCHECK_KEY", ""),
    )


def migrations_dir_override(environ: Mapping[str, str] | None = None) -> str:
    """``TOKENSVC_MIGRATIONS_DIR``: the Alembic scripts somewhere else than beside
    the package ("" if unset)."""
    env = os.environ if environ is None else environ
    return env.get(ENV_PREFIX + "MIGRATIONS_DIR", "")
