"""Which steering a request's `model` field asks for: a policy version, the latest one, or none.

`policy@7` is version 7; `policy` and `policy@latest` are the newest version at the moment the
request arrives, so a new save or a rollback is served from the next request on, without a
restart. A request keeps the version object it resolved for its whole life, so requests in flight
finish on the version they started with. Versions are immutable, so each is loaded once.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from safesteer.errors import SafeSteerError
from safesteer.identity import check_compatible
from safesteer.models import LoadedModel
from safesteer.policy import PolicyVersion

LATEST = "latest"
_VERSION = re.compile(r"[0-9]{1,9}")
"""A version number as a request may write it: ASCII digits only (not `¹` or `١`), at most nine."""


class UnknownModel(SafeSteerError):
    """The request names a policy or version this server does not have."""


@dataclass(frozen=True)
class Resolved:
    """What answers a request: `version` None means the bare model, unsteered."""

    name: str  # as reported back: "policy@7" or the bare model's name
    version: PolicyVersion | None


class PolicyResolver:
    def __init__(self, store, lm: LoadedModel, base_name: str) -> None:
        self.store = store
        self.lm = lm
        self.base_name = base_name
        self._versions: dict[tuple[str, int], PolicyVersion] = {}
        self._lock = threading.Lock()

    def resolve(self, model: str) -> Resolved:
        if model in (self.base_name, "base"):
            return Resolved(self.base_name, None)
        policy, _, number = model.partition("@")
        if not policy:
            raise UnknownModel(
                f"model {model!r}: name a policy (policy, policy@latest, policy@7) or {self.base_name!r}"
            )
        latest = self._latest(policy)
        if number in ("", LATEST):
            wanted = latest
        elif _VERSION.fullmatch(number) and 1 <= int(number) <= latest:
            wanted = int(number)
        else:
            shown = number if len(number) <= 20 else number[:20] + "…"
            raise UnknownModel(f"policy {policy!r} has no version {shown!r} (versions 1-{latest})")
        return Resolved(f"{policy}@{wanted}", self._version(policy, wanted))

    def _latest(self, policy: str) -> int:
        try:
            summary = self.store.policy(policy)
        except SafeSteerError:
            raise UnknownModel(f"no policy named {policy!r}") from None
        if summary.archived or not summary.latest:
            raise UnknownModel(f"policy {policy!r} has no version to serve")
        return int(summary.latest)

    def _version(self, policy: str, number: int) -> PolicyVersion:
        key = (policy, number)
        with self._lock:
            if key not in self._versions:
                version = self.store.load_version(policy, number)
                check_compatible(version.model, self.lm.identity)  # a version made for another model: refused
                self._versions[key] = version
            return self._versions[key]

    def names(self) -> list[str]:
        """What `GET /v1/models` lists: the bare model, then each live policy and every version it serves."""
        names = [self.base_name]
        for summary in self.store.list_policies():
            if summary.latest:
                names += [summary.name, *(f"{summary.name}@{n}" for n in range(int(summary.latest), 0, -1))]
        return names
