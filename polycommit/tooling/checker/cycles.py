"""Isolation anomalies of a list-append history, found as cycles of its dependency graph (Adya; as Elle does).

A list-append workload gives every key a list; a transaction appends unique values to some keys and
reads whole lists of others. Because a read returns the entire list, the reads reveal each key's
version order (every read of a key must be a prefix of its longest read), and from that order the
dependencies between transactions follow without trusting the database's word:

- ww (write-write): the writer of a key's i-th element precedes the writer of its (i+1)-th;
- wr (write-read): the writer of the last element a read saw precedes that reader;
- rw (read-write, anti-dependency): a reader precedes the writer of the element right after what it saw.

A cycle of ww edges alone is G0 (dirty write); a cycle of ww and wr edges with at least one wr is G1c
(circular information flow); a cycle with at least one rw edge is G2 (anti-dependency cycle: write
skew and its kin). Serializability forbids all three. Two anomalies need no cycle: G1a (a committed
transaction read a value an aborted one appended) and incompatible orders (two reads of one key that
are not prefixes of each other: no version order explains them). When the history ends with a read of
every key taken after every other transaction ended (`final_reads=True`), each key's longest read is its
final state, and a committed append missing from it is a lost append (a lost update).
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import networkx as nx

Key = Hashable
Value = Hashable
EdgeKind = Literal["ww", "wr", "rw"]
ANOMALIES: tuple[str, ...] = ("G0", "G1a", "G1c", "G2", "incompatible-order", "lost-append")


@dataclass(frozen=True)
class Append:
    key: Key
    value: Value


@dataclass(frozen=True)
class Read:
    key: Key
    values: tuple[Value, ...]


@dataclass(frozen=True)
class Txn:
    """One transaction of the history: its id, whether it committed, and its operations in order."""

    tx_id: str
    ops: tuple[Append | Read, ...]
    committed: bool = True


@dataclass(frozen=True)
class Anomaly:
    kind: str
    transactions: tuple[str, ...]  # the cycle, in order (or the transactions involved)
    detail: str


@dataclass
class Analysis:
    anomalies: list[Anomaly] = field(default_factory=list)
    version_orders: dict[Key, tuple[Value, ...]] = field(default_factory=dict)

    def kinds(self) -> set[str]:
        return {a.kind for a in self.anomalies}


def analyse(history: Iterable[Txn], *, final_reads: bool = False) -> Analysis:
    """Every anomaly the history shows (at most one example cycle per anomaly kind and component)."""
    txns = list(history)
    committed = [t for t in txns if t.committed]
    writer = _writers(txns)
    analysis = Analysis()
    orders = _version_orders(committed, analysis)
    analysis.version_orders = orders
    analysis.anomalies.extend(_aborted_reads(committed, writer, {t.tx_id for t in txns if not t.committed}))
    graph = _dependency_graph(committed, writer, orders)
    analysis.anomalies.extend(_cycles(graph))
    if final_reads:
        analysis.anomalies.extend(_lost_appends(committed, orders))
    return analysis


def _lost_appends(committed: Sequence[Txn], orders: dict[Key, tuple[Value, ...]]) -> list[Anomaly]:
    return [
        Anomaly("lost-append", (t.tx_id,), f"{op.key!r}: {op.value!r} is not in the final {orders.get(op.key, ())}")
        for t in committed
        for op in t.ops
        if isinstance(op, Append) and op.value not in orders.get(op.key, ())
    ]


def _writers(txns: Sequence[Txn]) -> dict[tuple[Key, Value], str]:
    writer: dict[tuple[Key, Value], str] = {}
    for t in txns:
        for op in t.ops:
            if isinstance(op, Append):
                if (op.key, op.value) in writer:
                    raise ValueError(f"value {op.value!r} appended twice to {op.key!r}: values must be unique")
                writer[(op.key, op.value)] = t.tx_id
    return writer


def _version_orders(committed: Sequence[Txn], analysis: Analysis) -> dict[Key, tuple[Value, ...]]:
    """Each key's longest committed read; a read that is not a prefix of it is an incompatible order."""
    longest: dict[Key, tuple[Value, ...]] = {}
    reads: list[tuple[str, Read]] = [(t.tx_id, op) for t in committed for op in t.ops if isinstance(op, Read)]
    for _, read in reads:
        if read.key not in longest or len(read.values) > len(longest[read.key]):
            longest[read.key] = read.values
    for tx_id, read in reads:
        if longest[read.key][: len(read.values)] != read.values:
            analysis.anomalies.append(
                Anomaly(
                    "incompatible-order",
                    (tx_id,),
                    f"{read.key!r}: read {read.values} is no prefix of {longest[read.key]}",
                )
            )
    return longest


def _aborted_reads(committed: Sequence[Txn], writer: dict[tuple[Key, Value], str], aborted: set[str]) -> list[Anomaly]:
    found: list[Anomaly] = []
    for t in committed:
        for op in t.ops:
            if isinstance(op, Read):
                for value in op.values:
                    source = writer.get((op.key, value))
                    if source in aborted:
                        found.append(
                            Anomaly("G1a", (t.tx_id, source), f"{op.key!r}: read {value!r} of aborted {source}")
                        )
    return found


def _dependency_graph(
    committed: Sequence[Txn], writer: dict[tuple[Key, Value], str], orders: dict[Key, tuple[Value, ...]]
) -> nx.MultiDiGraph:
    graph = nx.MultiDiGraph()
    graph.add_nodes_from(t.tx_id for t in committed)
    known = {t.tx_id for t in committed}

    def edge(source: str | None, target: str | None, kind: EdgeKind) -> None:
        if source is not None and target is not None and source != target and source in known and target in known:
            graph.add_edge(source, target, kind=kind)

    for key, order in orders.items():
        for earlier, later in itertools.pairwise(order):
            edge(writer.get((key, earlier)), writer.get((key, later)), "ww")
    for t in committed:
        for op in t.ops:
            if not isinstance(op, Read):
                continue
            order = orders.get(op.key, ())
            if op.values:
                edge(writer.get((op.key, op.values[-1])), t.tx_id, "wr")
            if order[: len(op.values)] == op.values and len(order) > len(op.values):
                edge(t.tx_id, writer.get((op.key, order[len(op.values)])), "rw")
    return graph


def _subgraph(graph: nx.MultiDiGraph, kinds: set[EdgeKind]) -> nx.DiGraph:
    sub = nx.DiGraph()
    sub.add_nodes_from(graph.nodes)
    for u, v, data in graph.edges(data=True):
        if data["kind"] in kinds:
            kinds_here = sub.get_edge_data(u, v, {}).get("kinds", set())
            sub.add_edge(u, v, kinds=kinds_here | {data["kind"]})
    return sub


def _cycles(graph: nx.MultiDiGraph) -> list[Anomaly]:
    """G0 in the ww graph; G1c through a wr edge of the ww+wr graph; G2 through an rw edge of the whole
    graph. An edge (u, v) lies on a cycle exactly when u and v share a strongly connected component, and
    the shortest path back from v to u closes one."""
    found: list[Anomaly] = []
    for kind, kinds, through in (
        ("G0", {"ww"}, "ww"),
        ("G1c", {"ww", "wr"}, "wr"),
        ("G2", {"ww", "wr", "rw"}, "rw"),
    ):
        sub = _subgraph(graph, kinds)  # type: ignore[arg-type]
        component = {node: i for i, scc in enumerate(nx.strongly_connected_components(sub)) for node in scc}
        reported: set[int] = set()
        for u, v, data in sub.edges(data=True):
            if through in data["kinds"] and component[u] == component[v] and component[u] not in reported:
                reported.add(component[u])
                back = nx.shortest_path(sub, v, u)
                cycle = (u, *back)
                found.append(Anomaly(kind, cycle, _describe(sub, cycle)))
    return found


def _describe(sub: nx.DiGraph, cycle: Sequence[str]) -> str:
    hops = [f"{a} -{'/'.join(sorted(sub[a][b]['kinds']))}-> {b}" for a, b in itertools.pairwise(cycle)]
    return ", ".join(hops)
