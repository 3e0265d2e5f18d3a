"""The audit log's hash chain: each entry's hash covers its content and the previous entry's hash.

Triggers refuse to change or delete audit entries, but anyone with the database file can drop a
trigger. The chain makes such edits evident: `PolicyStore.verify_audit` (`safesteer policy audit
--verify`) recomputes it and names the first entry that no longer matches.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any


def normalised(detail: dict[str, Any]) -> dict[str, Any]:
    """The detail as the JSON column gives it back (tuples become lists, odd values strings)."""
    return json.loads(json.dumps(detail, default=str))


def entry_hash(
    previous: str, at: datetime | str, actor: str, action: str, policy: str, version: int | None, detail: Any
) -> str:
    """sha256 over the previous hash and the entry's fields, in one canonical JSON form."""
    when = at if isinstance(at, datetime) else datetime.fromisoformat(str(at))
    if isinstance(detail, str):
        detail = json.loads(detail)
    body = json.dumps(
        [previous, when.isoformat(), actor, action, policy, version, detail],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()
