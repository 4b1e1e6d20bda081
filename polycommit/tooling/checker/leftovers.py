"""What the stores hold that no transaction of the log explains: orphan rows and nodes, prepared transactions.

Pure: the scans are done by `Stores`. An orphan scan must not call every row of a shared table an
orphan, so it is scoped twice: to the tables and labels the log's transactions wrote, and within each
to the key space they name — the longest common prefix of their (single, text) key values, when it is at
least `MIN_PREFIX` characters (a workload names its keys `<run>-<n>`). A target whose keys share no
such prefix is not scanned. Qdrant point ids are UUIDs or integers, with no such key space: points are
not scanned for orphans.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from polycommit.tooling.checker.expectations import Expect
from polycommit.tooling.checker.history import History
from polycommit.tooling.checker.report import ORPHAN, PREPARED_LEFT, Violation

MIN_PREFIX = 4
GID_PREFIX = "pc_"  # two-phase commit's PostgreSQL prepared transactions


@dataclass(frozen=True)
class Scope:
    """One orphan scan: the keys of `target` (a table or a label) whose `column` starts with `prefix`."""

    store: str
    target: str
    column: str
    prefix: str
    named: frozenset[str]  # the key values the log's transactions name there

    def describe(self, key: str) -> str:
        thing = "row" if self.store == "postgres" else "node"
        return f"{thing} {self.target}.{self.column}={key!r}"


def _common_prefix(texts: list[str]) -> str:
    low, high = min(texts), max(texts)  # the prefix common to the extremes is common to all
    size = 0
    while size < min(len(low), len(high)) and low[size] == high[size]:
        size += 1
    return low[:size]


def scopes(expects: Iterable[Expect]) -> list[Scope]:
    """The orphan scans the log's writes justify (rows and nodes keyed by one text column)."""
    named: dict[tuple[str, str, str], list[object]] = {}
    for e in expects:
        if e.store in ("postgres", "neo4j") and len(e.where[1]) == 1:
            column = e.where[1][0]
            named.setdefault((e.store, e.where[0], column), []).append(e.key.get(column))
    found: list[Scope] = []
    for (store, target, column), values in sorted(named.items()):
        if not all(isinstance(v, str) for v in values):
            continue
        texts = [str(v) for v in values]
        prefix = _common_prefix(texts)
        if len(prefix) >= MIN_PREFIX:
            found.append(Scope(store, target, column, prefix, frozenset(texts)))
    return found


def orphans(scope: Scope, present: Iterable[str]) -> list[Violation]:
    """Keys found in a scope that no transaction of the log names."""
    return [
        Violation("", ORPHAN, f"{scope.describe(key)} is written by no transaction of the log", scope.store)
        for key in sorted(set(present) - scope.named)
    ]


def owner_of(gid: str, tx_ids: Mapping[str, str]) -> str | None:
    """The transaction a prepared transaction's gid names (its id, with or without hyphens), if any."""
    for form, tx_id in tx_ids.items():
        if form in gid:
            return tx_id
    return None


def prepared_left(gids: Iterable[str], history: History) -> tuple[list[Violation], int]:
    """Prepared transactions of ours (gid `pc_...`) whose transaction is decided or ended: phase 2 never
    reached PostgreSQL. Those of an undecided transaction are pending; those naming no transaction of this
    log belong to another prefix's log and are not judged. Returns (violations, pending)."""
    forms = {form: tx for tx in history.intents for form in (tx, tx.replace("-", ""))}
    found: list[Violation] = []
    pending = 0
    for gid in sorted(gids):
        if not gid.startswith(GID_PREFIX):
            continue
        tx_id = owner_of(gid, forms)
        if tx_id is None:
            continue
        final = history.final(tx_id)
        if final is None:
            pending += 1
        else:
            what = f"prepared transaction {gid!r} still open in PostgreSQL; the transaction is {final}"
            found.append(Violation(tx_id, PREPARED_LEFT, what, "postgres"))
    return found, pending
