"""The store on a real PostgreSQL server, shared by two policy servers (replicas), started by the test itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from db import PolicyStore
from server import PolicyResolver
from tests.conftest import free_port
from tests.policy_factory import category

BIN = Path(shutil.which("pg_ctl") or "/usr/lib/postgresql/bin/pg_ctl").parent


def _as_postgres(args: list[str]) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user then."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + args, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg")
    if not (BIN / "initdb").exists() or (os.geteuid() == 0 and not shutil.which("runuser")):
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed here")
    folder = Path(tempfile.mkdtemp(prefix="safesteer-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    made = _as_postgres([str(BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    if made.returncode != 0:
        pytest.skip(f"initdb could not run here: {made.stderr.strip()[:200]}")
    options = f"-p {port} -k {folder} -c listen_addresses=''"
    pg_ctl = [str(BIN / "pg_ctl"), "-D", str(data)]
    started = _as_postgres([*pg_ctl, "-o", options, "-l", str(folder / "log"), "-w", "start"])
    assert started.returncode == 0, started.stderr
    yield f"postgresql+psycopg://postgres@/postgres?host={folder}&port={port}"
    _as_postgres([*pg_ctl, "-m", "fast", "-w", "stop"])
    shutil.rmtree(folder, ignore_errors=True)


def test_two_replicas_share_one_postgres_store(postgres_url, tiny_lm):
    first, second = PolicyStore(postgres_url), PolicyStore(postgres_url)  # two servers, one database
    first.save_version("shared", [category("weapons", identity=tiny_lm.identity)], author="ann")
    replica_a = PolicyResolver(first, tiny_lm, "base")
    replica_b = PolicyResolver(second, tiny_lm, "base")
    assert replica_a.resolve("shared").name == replica_b.resolve("shared").name == "shared@1"
    stronger = category("weapons", identity=tiny_lm.identity, strength=6.0)
    second.save_version("shared", [stronger], author="bob", note="stronger")
    assert replica_a.resolve("shared@latest").name == "shared@2"  # saved through the other replica
    loaded = replica_a.resolve("shared").version
    assert loaded is not None and loaded.categories[0].strength == 6.0 and loaded.author == "bob"
    assert loaded.categories[0].gate is not None  # gates survive PostgreSQL's bytea like SQLite's blobs
    assert first.rollback("shared", 1, actor="ann") == 3
    assert replica_b.resolve("shared").version.categories[0].strength == 2.0
    assert [e.action for e in second.audit_log("shared")][:3] == ["rollback", "save", "save"]
    assert first.verify_audit().ok
