"""Schemas parse, events round-trip, older writers stay readable, and garbage gives typed errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fastavro import parse_schema, schemaless_writer

from polycommit import operations as ops
from polycommit.client import Saga
from polycommit.codec import EVENT_TYPES, MAGIC, EventCodec, SchemaRegistry, _fingerprint, default_codec, schema_dir
from polycommit.errors import CorruptEventError, InvalidEventError, UnexpectedEventTypeError, UnknownSchemaError


def test_every_schema_file_parses_and_every_event_type_is_registered() -> None:
    registry = SchemaRegistry(schema_dir())
    assert set(registry.current) == set(EVENT_TYPES)
    files = sorted((e for e in schema_dir().iterdir() if e.name.endswith(".avsc")), key=lambda e: e.name)
    assert len(files) >= len(EVENT_TYPES)
    for path in files:
        json.loads(path.read_text())  # each file is JSON
    # Every writer version is distinct (fingerprints identify versions).
    history = [e for e in (schema_dir() / "history").iterdir() if e.name.endswith(".avsc")]
    assert len(registry.writers) == len(EVENT_TYPES) + len(history)


def test_an_intent_round_trips() -> None:
    codec = default_codec()
    saga = Saga("ingest").step(ops.upsert_row("documents", {"id": 1}, {"title": "x"}))
    saga.step(ops.upsert_points("docs", [ops.point(7, [0.5, 0.25], {"a": 1})]))
    saga.step(ops.merge_relationship("MENTIONS", ops.node("Doc", {"id": 1}), ops.node("Entity", {"name": "x"})))
    intent = saga.intent("polycommit.replies:1", "me")
    data = codec.encode("TransactionIntent", intent)
    assert data[:2] == MAGIC
    decoded = codec.decode(data)
    assert decoded.event_type == "TransactionIntent"
    assert decoded.record == intent


def test_a_record_from_an_older_schema_version_is_read_with_the_newer_one() -> None:
    codec = default_codec()
    old_schema = parse_schema(json.loads((schema_dir() / "history" / "polycommit.StepOutcome.v1.avsc").read_text()))
    old = {
        "tx_id": "t",
        "step_index": 2,
        "action": "COMPENSATE",
        "attempt": 1,
        "store": "neo4j",
        "status": "NOOP",
        "before_image": None,
        "error": None,
        "at_ms": 5,
    }
    body = io.BytesIO()
    body.write(MAGIC + _fingerprint(old_schema))
    schemaless_writer(body, old_schema, old)
    decoded = codec.decode(body.getvalue())
    assert decoded.writer_version == "1"
    assert decoded.record == {**old, "duration_us": 0}  # the field v2 added takes its default


def test_corrupt_bytes_give_a_typed_error() -> None:
    codec = default_codec()
    good = codec.encode("Alert", {"kind": "stuck", "tx_id": "t", "message": "m", "at_ms": 1})
    for bad in (b"", b"hello world", b"\x00" * 40, good[:-3], good + b"\x00\x01", None):
        with pytest.raises(CorruptEventError):
            codec.decode(bad)


def test_an_unknown_schema_id_gives_a_typed_error() -> None:
    codec = default_codec()
    good = codec.encode("Alert", {"kind": "stuck", "tx_id": "t", "message": "m", "at_ms": 1})
    forged = MAGIC + b"\xde\xad\xbe\xef\x00\x00\x00\x01" + good[10:]
    with pytest.raises(UnknownSchemaError):
        codec.decode(forged)
    with pytest.raises(UnknownSchemaError):
        codec.encode("NoSuchEvent", {})


def test_a_record_that_does_not_match_its_schema_cannot_be_written() -> None:
    with pytest.raises(InvalidEventError):
        default_codec().encode("Alert", {"kind": "stuck"})


def test_decode_as_refuses_another_event_type() -> None:
    codec = default_codec()
    data = codec.encode("Alert", {"kind": "stuck", "tx_id": "t", "message": "m", "at_ms": 1})
    with pytest.raises(UnexpectedEventTypeError):
        codec.decode_as(data, "TransactionIntent")


def test_a_reader_without_history_cannot_resolve_old_writers(tmp_path: Path) -> None:
    for path in (e for e in schema_dir().iterdir() if e.name.endswith(".avsc")):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "history").mkdir()
    codec = EventCodec(SchemaRegistry(tmp_path))
    old_schema = parse_schema(json.loads((schema_dir() / "history" / "polycommit.StepOutcome.v1.avsc").read_text()))
    with pytest.raises(UnknownSchemaError):
        codec.decode(MAGIC + _fingerprint(old_schema) + b"\x00" * 8)
