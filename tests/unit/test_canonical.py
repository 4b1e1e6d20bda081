"""A foreign producer's intent becomes byte-equal to the Python SDK's intent for the same change."""

from __future__ import annotations

import copy
import json
import random
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polycommit import operations as ops
from polycommit.canonical import canonical_intent, canonical_json, canonical_operation
from polycommit.client import Saga
from polycommit.errors import InvalidOperationError
from polycommit.events import Operation


def foreign(value: Any, seed: int = 0) -> str:
    """JSON as another language's library might write it: keys in another order, spaces, non-ASCII raw."""
    rng = random.Random(seed)

    def shuffle(v: Any) -> Any:
        if isinstance(v, dict):
            items = list(v.items())
            rng.shuffle(items)
            return {k: shuffle(x) for k, x in items}
        if isinstance(v, list):
            return [shuffle(x) for x in v]
        return v

    return json.dumps(shuffle(value), indent=rng.choice([None, 2]), separators=(" , ", " : "), ensure_ascii=False)


def test_foreign_spacing_and_key_order_give_the_sdk_lock_keys() -> None:
    key, values = {"tenant": "t1", "id": 7}, {"title": "Ledger ü", "tags": ["a", "b"], "n": 1.5}
    cases = [
        (ops.upsert_row("documents", key, values), {"key": foreign(key, 1), "values": foreign(values, 2)}),
        (ops.merge_node("Document", key, values), {"key": foreign(key, 3), "values": foreign(values, 4)}),
        (ops.delete_row("documents", key), {"key": foreign(key, 5)}),
    ]
    for sdk, written in cases:
        theirs: Operation = {**sdk, **written}  # type: ignore[typeddict-item]
        # Lock keys come from the parsed operation, so they agree even before canonicalisation; the
        # batch grouping and the stored intent still compare the raw text, which canonicalisation fixes.
        assert ops.lock_keys(theirs) == ops.lock_keys(sdk)
        assert theirs["key"] != sdk["key"]
        assert canonical_operation(theirs) == sdk
        assert ops.lock_keys(canonical_operation(theirs)) == ops.lock_keys(sdk)


def test_relationship_ends_points_and_params_are_canonical() -> None:
    a, b = ops.node("Customer", {"id": "c", "region": "eu"}), ops.node("Document", {"id": "d"})
    sdk = ops.merge_relationship("WROTE", a, b, {"since": 2020, "role": "author"})
    theirs = copy.deepcopy(sdk)
    assert theirs["from_node"] is not None and theirs["to_node"] is not None
    theirs["from_node"]["key"] = '{ "region" : "eu", "id" : "c" }'
    theirs["to_node"]["key"] = '{"id": "d"}'
    theirs["values"] = '{"role": "author",\n "since": 2020}'
    assert canonical_operation(theirs) == sdk
    cypher = ops.cypher("MATCH (n {id: $id}) SET n.x = $x", {"x": [1, 2], "id": "n1"})
    assert canonical_operation({**cypher, "params": '{"x": [1, 2], "id": "n1"}'}) == cypher
    sql = ops.sql("UPDATE t SET a = $1 WHERE id = $2", ["x", 3])
    assert canonical_operation({**sql, "params": '[ "x", 3 ]'}) == sql


def test_a_non_uuid_string_point_id_becomes_the_sdk_uuid5() -> None:
    vector = [0.5, 0.25]
    sdk = ops.upsert_points("documents", [ops.point("doc-7", vector, {"title": "x", "n": 1})])
    theirs = ops.upsert_points("documents", [{"id": "doc-7", "vector": vector, "payload": '{"n": 1, "title": "x"}'}])
    canonical = canonical_operation(theirs)
    assert canonical == sdk
    assert canonical["points"][0]["id"] == ops.point_id("doc-7") != "doc-7"
    assert uuid.UUID(canonical["points"][0]["id"]).version == 5


@pytest.mark.parametrize(
    ("written", "expected"),
    [("42", "42"), ("0042", "42"), ("6F1C2B1E-4A7D-4D2A-9A53-2F0D3C1F0B5E", "6f1c2b1e-4a7d-4d2a-9a53-2f0d3c1f0b5e")],
)
def test_integer_and_uuid_point_ids_are_normalised(written: str, expected: str) -> None:
    op = ops.delete_points("documents", ["1"])
    assert canonical_operation({**op, "point_ids": [written]})["point_ids"] == [expected]
    assert ops.lock_keys(canonical_operation({**op, "point_ids": [written]})) == [f"qdrant:documents:{expected}"]


def test_an_sdk_intent_is_unchanged_and_the_input_is_not_mutated() -> None:
    saga = Saga("ingest").step(ops.upsert_row("documents", {"id": 1}, {"title": "x"}))
    saga.step(ops.upsert_points("docs", [ops.point("p", [0.5], {"a": 1})]))
    saga.step(
        ops.sql("UPDATE t SET a = $1", [1]),
        compensate=ops.sql("UPDATE t SET a = $1", [0]),
    )
    intent = saga.intent("replies:0", "me")
    assert canonical_intent(intent) == intent
    foreign_intent = copy.deepcopy(intent)
    foreign_intent["steps"][0]["operation"]["values"] = '{ "title" : "x" }'
    assert foreign_intent["steps"][2]["compensation"] is not None
    foreign_intent["steps"][2]["compensation"]["params"] = "[ 0 ]"
    snapshot = copy.deepcopy(foreign_intent)
    assert canonical_intent(foreign_intent) == intent
    assert foreign_intent == snapshot


def test_json_that_does_not_parse_names_the_step_and_field() -> None:
    saga = Saga("bad").step(ops.delete_row("t", {"id": 1})).step(ops.upsert_row("t", {"id": 2}, {"a": 1}))
    intent = saga.intent("", "me")
    intent["steps"][1]["operation"]["values"] = "{'a': 1}"
    with pytest.raises(InvalidOperationError, match=r"^step 1: operation values is not JSON"):
        canonical_intent(intent)
    with pytest.raises(InvalidOperationError, match="payload"):
        canonical_operation(ops.upsert_points("c", [{"id": "1", "vector": [1.0], "payload": "{"}]))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(json_values, st.integers(0, 1000))
def test_any_spelling_of_a_json_value_canonicalises_to_the_sdk_text(value: Any, seed: int) -> None:
    assert canonical_json(foreign(value, seed), "v") == ops.dumps(value)
    assert canonical_json(ops.dumps(value), "v") == ops.dumps(value)
