"""Connecting to the database and bringing its schema up to date.

SQLite is set up for several writers: WAL (readers never block the writer), foreign keys on,
a generous busy timeout, and `BEGIN IMMEDIATE` for every transaction, so two processes saving
versions of one policy queue up for the write lock instead of both reading the same "next
version number" and colliding.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event

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


def make_engine(url: str | None = None) -> Engine:
    url = database_url(url)
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    path = url.split("///", 1)[1] if "///" in url else ""
    if path and path != ":memory:":
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})

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
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
