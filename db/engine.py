"""Connecting to the database and bringing its schema up to date.

SQLite is set up for several writers: WAL (readers never block the writer), foreign keys on,
a generous busy timeout, and `BEGIN IMMEDIATE` for every transaction, so two processes saving
versions of one policy queue up for the write lock instead of both reading the same "next
version number" and colliding.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from safesteer.errors import SafeSteerError

MIGRATIONS = Path(__file__).parent / "migrations"
BUSY_TIMEOUT_S = 30


def default_data_dir() -> Path:
    """`SAFESTEER_DATA`, else `/data` (persistent storage on Hugging Face Spaces), else the user's data folder."""
    configured = os.environ.get("SAFESTEER_DATA")
    if configured:
        return Path(configured).expanduser()
    spaces = Path("/data")
    if spaces.is_dir() and os.access(spaces, os.W_OK):
        return spaces / "safesteer"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "safesteer"


def database_url(url: str | None = None) -> str:
    """The URL to use: the argument, else `SAFESTEER_DB`, else a SQLite file in the data folder."""
    if url:
        return url
    if os.environ.get("SAFESTEER_DB"):
        return os.environ["SAFESTEER_DB"]
    return f"sqlite:///{default_data_dir() / 'safesteer.db'}"


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError as exc:
        raise SafeSteerError(
            f"invalid database URL {url!r}: use e.g. sqlite:///path/to/store.db or postgresql://user@host/db"
        ) from exc


def make_engine(url: str | None = None) -> Engine:
    """An engine for the URL; a SQLite file's folder must exist, except the project's own default folder."""
    url = database_url(url)
    parsed = _parse(url)
    try:
        if not parsed.drivername.startswith("sqlite"):
            return create_engine(parsed, pool_pre_ping=True)
        path = parsed.database or ""
        if path and path != ":memory:":
            folder = Path(path).expanduser().parent
            if not folder.is_dir():
                if folder != default_data_dir():
                    raise SafeSteerError(f"no such folder for the database: {folder} (create it first)")
                folder.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_S})
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise SafeSteerError(f"cannot open database {url!r}: {str(exc).splitlines()[0]}") from exc

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, connection_record) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def migrate(engine: Engine) -> None:
    """Run Alembic migrations up to head (safe to call at every start-up, from several processes)."""
    from alembic import command  # only opening a store runs migrations
    from alembic.config import Config  # only opening a store runs migrations

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
