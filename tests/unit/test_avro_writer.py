"""The generated Avro encoders (polycommit/avro_writer.py) write fastavro's bytes, for records generated
from every event schema, and leave whatever they cannot encode exactly to fastavro: the codec's bytes and
errors are what they were with fastavro alone."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import pytest
from fastavro import schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from polycommit.avro_writer import compile_writer
from polycommit.codec import MAGIC, default_codec
from polycommit.errors import InvalidEventError

CODEC = default_codec()
EVENT_TYPES = sorted(CODEC.registry.current)


def fastavro_bytes(event_type: str, record: Mapping[str, Any]) -> bytes:
    """What the codec wrote before the generated encoders: fastavro's writer alone."""
    schema = CODEC.registry.current[event_type]
    buffer = io.BytesIO()
    buffer.write(MAGIC + schema.fingerprint)
    try:
        schemaless_writer(buffer, schema.parsed, record)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise InvalidEventError(str(exc)) from exc
    return buffer.getvalue()


PRIMITIVES: dict[str, st.SearchStrategy[Any]] = {
    "null": st.none(),
    "boolean": st.booleans(),
    "int": st.integers(-(2**31), 2**31 - 1),
    "long": st.integers(-(2**63), 2**63 - 1),
    "float": st.floats(width=32, allow_nan=False),
    "double": st.floats(allow_nan=False),
    "string": st.text(max_size=20),
    "bytes": st.binary(max_size=20),
}


def records_of(schema: Any, named: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Valid values of a parsed schema; record fields with a default are sometimes left out."""
    if isinstance(schema, str):
        return PRIMITIVES[schema] if schema in PRIMITIVES else st.deferred(lambda: named[schema])
    if isinstance(schema, list):
        return st.one_of(*(records_of(branch, named) for branch in schema))
    kind = schema["type"]
    if kind == "record":
        required = {f["name"]: records_of(f["type"], named) for f in schema["fields"] if "default" not in f}
        optional = {f["name"]: records_of(f["type"], named) for f in schema["fields"] if "default" in f}
        found = named[schema["name"]] = st.fixed_dictionaries(required, optional=optional)
        return found
    if kind == "enum":
        found = named[schema["name"]] = st.sampled_from(schema["symbols"])
        return found
    if kind == "array":
        return st.lists(records_of(schema["items"], named), max_size=3)
    if kind == "map":
        return st.dictionaries(st.text(max_size=5), records_of(schema["values"], named), max_size=3)
    return PRIMITIVES[kind]


@st.composite
def events(draw: st.DrawFn) -> tuple[str, Any]:
    event_type = draw(st.sampled_from(EVENT_TYPES))
    return event_type, draw(records_of(CODEC.registry.current[event_type].parsed, {}))


def test_every_event_schema_compiles() -> None:
    for event_type in EVENT_TYPES:
        compile_writer(CODEC.registry.current[event_type].parsed)


@settings(max_examples=600, deadline=None)
@given(events())
def test_the_generated_encoders_write_fastavros_bytes(event: tuple[str, Any]) -> None:
    event_type, record = event
    schema = CODEC.registry.current[event_type]
    assert MAGIC + schema.fingerprint + compile_writer(schema.parsed)(record) == fastavro_bytes(event_type, record)
    assert CODEC.decode(CODEC.encode(event_type, record)).event_type == event_type


def command(**changes: Any) -> dict[str, Any]:
    operation = {"store": "postgres", "kind": "upsert_row", "target": "t", "key": '{"id": 1}', "values": "{}"}
    return {"tx_id": "t1", "step_index": 0, "action": "EXECUTE", "attempt": 1, "operation": operation, **changes}


@pytest.mark.parametrize(
    "odd",
    [
        command(),  # valid: the generated path
        command(step_index=1.0),  # fastavro casts a float of an int: its bytes, by falling back to it
        command(step_index=True),
        command(step_index="one"),  # invalid: fastavro's error
        command(action="JUMP"),
        command(step_index=2**64),
        {k: v for k, v in command().items() if k != "attempt"},  # a missing field with a default
        {k: v for k, v in command().items() if k != "tx_id"},  # a missing field without one
        command(tx_id=b"bytes for a string"),
        command(extra="ignored"),
    ],
)
def test_the_codec_writes_and_refuses_what_fastavro_alone_did(odd: dict[str, Any]) -> None:
    try:
        expected: bytes | type[Exception] = fastavro_bytes("StoreCommand", odd)
    except InvalidEventError:
        expected = InvalidEventError
    if expected is InvalidEventError:
        with pytest.raises(InvalidEventError):
            CODEC.encode("StoreCommand", odd)
    else:
        assert CODEC.encode("StoreCommand", odd) == expected
