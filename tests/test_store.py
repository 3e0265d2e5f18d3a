import multiprocessing
import sqlite3

import pytest
import torch
from sqlalchemy import inspect, text

from db import PolicyStore
from safesteer import SafeSteerError
from tests.policy_factory import category


@pytest.fixture()
def store(tmp_path):
    return PolicyStore(f"sqlite:///{tmp_path / 'policies.db'}")


def test_migrations_create_the_schema_from_empty(tmp_path):
    path = tmp_path / "fresh.db"
    store = PolicyStore(f"sqlite:///{path}")
    tables = set(inspect(store.engine).get_table_names())
    assert {
        "policies",
        "policy_versions",
        "categories",
        "examples",
        "audit_log",
        "evaluations",
        "drafts",
        "alembic_version",
    } <= tables
    assert "steering" in {c["name"] for c in inspect(store.engine).get_columns("categories")}
    with store.engine.connect() as conn:
        assert conn.execute(text("select version_num from alembic_version")).scalar() == "0005"
        assert conn.execute(text("pragma journal_mode")).scalar() == "wal"
        assert conn.execute(text("pragma foreign_keys")).scalar() == 1
    PolicyStore(f"sqlite:///{path}")  # opening again is a no-op migration


def test_migrations_downgrade_and_upgrade_again(tmp_path):
    from alembic import command
    from alembic.config import Config

    from db.engine import MIGRATIONS

    store = PolicyStore(f"sqlite:///{tmp_path / 'm.db'}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert "policies" not in inspect(store.engine).get_table_names()
    PolicyStore(f"sqlite:///{tmp_path / 'm.db'}")
    assert "policies" in inspect(store.engine).get_table_names()


def test_versions_are_numbered_loaded_and_listed(store):
    assert store.save_version("Weapons policy", [category()], author="ann", note="first", description="d") == 1
    assert store.save_version("Weapons policy", [category(seed=1), category("fraud", seed=2)], author="bob") == 2
    [summary] = store.list_policies()
    assert (summary.name, summary.versions, summary.latest, summary.description) == ("Weapons policy", 2, 2, "d")
    versions = store.list_versions("Weapons policy")
    assert [(v.number, v.author, v.categories) for v in versions] == [
        (1, "ann", ["weapons"]),
        (2, "bob", ["weapons", "fraud"]),
    ]
    loaded = store.load_version("Weapons policy", 1)
    original = category()
    assert loaded.number == 1 and loaded.note == "first" and loaded.author == "ann"
    [c] = loaded.categories
    torch.testing.assert_close(c.vectors.vectors, original.vectors.vectors)
    assert (c.harmful, c.safe, c.layer, c.strength) == (original.harmful, original.safe, 1, 2.0)
    assert c.vectors.settings == original.vectors.settings
    assert store.load_version("Weapons policy").number == 2


def test_saved_versions_are_immutable(store, tmp_path):
    store.save_version("p", [category()])
    with sqlite3.connect(tmp_path / "policies.db") as conn, pytest.raises(sqlite3.IntegrityError, match="immutable"):
        conn.execute("update policy_versions set note = 'rewritten'")


def test_diff_reports_examples_settings_and_cosines(store):
    store.save_version("p", [category(harmful=["a", "b", "c", "d"])])
    changed = category(harmful=["a", "b", "c", "e"], seed=5, layer=2, strength=3.0)
    store.save_version("p", [changed, category("fraud", seed=2)])
    diff = store.diff("p", 1, 2)
    by_name = {c.name: c for c in diff.categories}
    weapons = by_name["weapons"]
    assert weapons.status == "changed"
    assert (weapons.harmful_added, weapons.harmful_removed) == (["e"], ["d"])
    retrained_gate = weapons.settings_changed.pop("gate_threshold")  # new activations (seed 5) train a new gate
    assert retrained_gate[0] != retrained_gate[1]
    assert weapons.settings_changed == {"layer": (1, 2), "strength": (2.0, 3.0)}
    assert len(weapons.cosine_by_layer) == 4 and all(-1.0 <= x <= 1.0 for x in weapons.cosine_by_layer)
    assert by_name["fraud"].status == "added"
    assert store.diff("p", 1, 1).categories[0].status == "unchanged"


def test_rollback_saves_the_old_version_as_newest_and_keeps_history(store):
    store.save_version("p", [category(strength=1.0)])
    store.save_version("p", [category(strength=5.0)])
    assert store.rollback("p", 1, actor="ann") == 3
    latest = store.load_version("p")
    assert (latest.number, latest.restored_from, latest.categories[0].strength) == (3, 1, 1.0)
    assert [v.number for v in store.list_versions("p")] == [1, 2, 3]
    assert [e.action for e in store.audit_log("p")] == ["rollback", "save", "save", "create"]


def test_archive_and_delete_need_intent(store):
    store.save_version("p", [category()])
    store.archive_policy("p", actor="ann")
    assert store.list_policies() == [] and store.list_policies(include_archived=True)[0].archived
    with pytest.raises(SafeSteerError, match="archived"):
        store.save_version("p", [category()])
    with pytest.raises(SafeSteerError, match="confirm by typing its name"):
        store.delete_policy("p", confirm="yes")
    store.delete_policy("p", confirm="p", actor="ann")
    assert store.list_policies(include_archived=True) == []
    with store.engine.connect() as conn:
        assert conn.execute(text("select count(*) from examples")).scalar() == 0
    assert store.audit_log("p")[0].action == "delete"


def test_bad_names_and_empty_policies_are_refused(store):
    with pytest.raises(SafeSteerError, match="invalid policy name"):
        store.save_version("../etc/passwd", [category()])
    with pytest.raises(SafeSteerError, match="at least one category"):
        store.save_version("p", [])
    with pytest.raises(SafeSteerError, match="no policy named"):
        store.load_version("nope")
    store.create_policy("q")
    with pytest.raises(SafeSteerError, match="already exists"):
        store.create_policy("q")
    with pytest.raises(SafeSteerError, match="has no versions yet"):
        store.load_version("q")


def test_a_crash_mid_save_leaves_the_database_as_it_was(store, monkeypatch):
    store.save_version("p", [category()])
    before = store.audit_log()

    def explode(session, row, categories):
        session.add(row)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(PolicyStore, "_insert_categories", staticmethod(explode))
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.save_version("p", [category(seed=3)])
    with pytest.raises(RuntimeError):
        store.save_version("new policy", [category()])
    assert [v.number for v in store.list_versions("p")] == [1]
    assert [p.name for p in store.list_policies()] == ["p"]
    assert store.audit_log() == before


def _save_many(url: str, worker: int, count: int) -> list[int]:
    store = PolicyStore(url)
    return [store.save_version("shared", [category(seed=worker * 100 + i)], author=f"w{worker}") for i in range(count)]


def test_concurrent_savers_in_separate_processes_never_collide(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    PolicyStore(url)
    context = multiprocessing.get_context("spawn")
    with context.Pool(3) as pool:
        results = pool.starmap(_save_many, [(url, w, 5) for w in range(3)])
    numbers = sorted(n for r in results for n in r)
    assert numbers == list(range(1, 16))
    store = PolicyStore(url)
    versions = store.list_versions("shared")
    assert [v.number for v in versions] == list(range(1, 16))
    assert sorted(v.author for v in versions) == sorted(f"w{w}" for w in range(3) for _ in range(5))


def _add_category(url: str, name: str) -> int:
    return PolicyStore(url).save_version("shared", [category(name, seed=len(name))], keep_other_categories=True)


def test_categories_added_at_once_by_two_processes_both_reach_the_newest_version(tmp_path):
    url = f"sqlite:///{tmp_path / 'merge.db'}"
    store = PolicyStore(url)
    store.save_version("shared", [category("base")])
    names = ["weapons", "fraud", "spam", "malware"]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        numbers = pool.starmap(_add_category, [(url, n) for n in names])
    assert sorted(numbers) == [2, 3, 4, 5]
    latest = store.load_version("shared")
    assert latest.number == 5 and sorted(c.name for c in latest.categories) == sorted(["base", *names])


def test_adding_a_category_replaces_one_of_the_same_name(store):
    store.save_version("p", [category("weapons", strength=1.0), category("fraud", seed=2)])
    store.save_version("p", [category("weapons", strength=5.0)], keep_other_categories=True)
    latest = store.load_version("p")
    assert [(c.name, c.strength) for c in latest.categories] == [("weapons", 5.0), ("fraud", 2.0)]


def test_an_amendment_sees_the_categories_the_new_version_really_holds(store):
    from dataclasses import replace

    store.save_version("p", [category("weapons", strength=1.0)])
    store.save_version("p", [category("fraud", seed=2)], keep_other_categories=True)  # another author, meanwhile
    seen: list[list[str]] = []

    def amend(categories):
        seen.append([c.name for c in categories])
        return [replace(c, strength=c.strength + 0.5) for c in categories]

    number = store.save_version("p", [category("spam", seed=3)], keep_other_categories=True, amend=amend)
    assert seen == [["weapons", "fraud", "spam"]]
    assert [(c.name, c.strength) for c in store.load_version("p", number).categories] == [
        ("weapons", 1.5),
        ("fraud", 2.5),
        ("spam", category("spam", seed=3).strength + 0.5),
    ]

    def fails(categories):
        raise SafeSteerError("no model to learn the routers with")

    with pytest.raises(SafeSteerError, match="no model"):
        store.save_version("p", [category("malware", seed=4)], keep_other_categories=True, amend=fails)
    assert store.load_version("p").number == number  # nothing half-saved


def test_upgrading_a_0001_database_keeps_its_policies(tmp_path):
    from alembic import command
    from alembic.config import Config

    from db.engine import MIGRATIONS, make_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    assert "evaluations" not in inspect(engine).get_table_names()
    with engine.begin() as connection:
        connection.execute(
            text(
                "insert into policies (name, description, archived, created_at, created_by) "
                "values ('old', '', 0, '2026-01-01', 'x')"
            )
        )
    store = PolicyStore(url)  # migrates to head on open
    assert "evaluations" in inspect(store.engine).get_table_names()
    assert [p.name for p in store.list_policies()] == ["old"]


def test_evaluations_attach_to_immutable_versions(store):
    store.save_version("p", [category()])
    store.add_evaluation("p", 1, "sweep", {"recommended": {"layer": 1}}, author="ann")
    store.add_evaluation("p", 1, "human_review", {"steered": {"rate": 0.1}}, author="bob")
    store.add_evaluation("p", 1, "sweep", {"recommended": {"layer": 2}}, author="ann")
    version = store.load_version("p", 1)
    assert version.evaluation == {"sweep": {"recommended": {"layer": 2}}, "human_review": {"steered": {"rate": 0.1}}}
    assert [v.number for v in store.list_versions("p")] == [1]
    assert store.audit_log("p")[0].action == "evaluate"
    with pytest.raises(SafeSteerError, match="no version 9"):
        store.add_evaluation("p", 9, "sweep", {})


def test_drafts_are_per_author_saved_over_and_capped(tmp_path):
    from db.drafts import MAX_DRAFTS_PER_AUTHOR, DraftStore

    store = PolicyStore(f"sqlite:///{tmp_path / 'drafts.db'}")
    drafts = DraftStore(store.engine)
    drafts.save("ann", "fraud", {"harmful": ["a"], "safe": ["b"]}, None)
    drafts.save("ann", "fraud", {"harmful": ["a", "c"], "safe": ["b"]}, b"vectors")  # saved over, not added
    drafts.save("bob", "fraud", {"harmful": ["x"], "safe": ["y"]}, None)
    (ann,) = drafts.list("ann")
    assert ann.data["harmful"] == ["a", "c"] and ann.vectors == b"vectors"
    assert drafts.load("bob", "fraud").data["harmful"] == ["x"]  # each author sees their own
    for i in range(MAX_DRAFTS_PER_AUTHOR + 2):
        drafts.save("ann", f"c{i}", {"harmful": [], "safe": []}, None)
    names = [d.name for d in drafts.list("ann")]
    assert len(names) == MAX_DRAFTS_PER_AUTHOR and "fraud" not in names and names[0] == f"c{MAX_DRAFTS_PER_AUTHOR + 1}"
    drafts.delete("bob", "fraud")
    assert drafts.list("bob") == []
