"""Schema migrations through Alembic, from code (``tokensvc migrate``, and
``serve`` on SQLite)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.errors import ConfigurationError
from tokensvc.settings import migrations_dir_override


def migrations_dir() -> Path:
    """The Alembic scripts: ``TOKENSVC_MIGRATIONS_DIR``, else beside the package."""
    override = migrations_dir_override()
    candidates = [Path(override)] if override else []
    here = Path(__file__).resolve().parent.parent
    candidates += [here / "_migrations", here.parent / "migrations"]
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigurationError("the migrations folder is missing from this installation")


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def current_revision(engine: AsyncEngine) -> str | None:
    def read(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(read)


async def upgrade(engine: AsyncEngine, target: str = "head") -> None:
    def run(connection: Connection) -> None:
        command.upgrade(alembic_config(connection), target)

    async with engine.begin() as conn:
        await conn.run_sync(run)


async def downgrade(engine: AsyncEngine, target: str) -> None:
    def run(connection: Connection) -> None:
        command.downgrade(alembic_config(connection), target)

    async with engine.begin() as conn:
        await conn.run_sync(run)


async def require_current(engine: AsyncEngine) -> None:
    """Refuses a database whose schema is not the one this version expects."""
    current, head = await current_revision(engine), head_revision()
    if current != head:
        raise ConfigurationError(
            f"the database schema is at {current or 'nothing (empty database)'}, "
            f"this tokensvc needs {head}: run `tokensvc migrate` with the same "
            "--database-url first"
        )
