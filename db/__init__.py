"""The policy store: SQLite (or any SQLAlchemy URL) holding versioned policies and an audit log."""

from .engine import database_url, make_engine, migrate
from .store import PolicyStore

__all__ = ["PolicyStore", "database_url", "make_engine", "migrate"]
