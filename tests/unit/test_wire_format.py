"""The single-object framing follows the Avro specification, and records framed the old way stay readable."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from fastavro import schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from polycommit.codec import (
    EVENT_TYPES,
    HEADER_SIZE,
    MAGIC,
    crc64_avro,
    default_codec,
    legacy_reversed_fingerprint,
)
from polycommit.errors import UnknownSchemaError

LEGACY = json.loads((Path(__file__).parent / "fixtures" / "legacy_fingerprint_events.json").read_text())["events"]


def _bitwise_crc64_avro(data: bytes) -> int:
    """The specification's algorithm without the lookup table, as an independent check of the fast one."""
    fp = 0xC15D213AA4D7A795
    for byte in data:
        fp ^= byte
        for _ in range(8):
            fp = (fp >> 1) ^ (0xC15D213AA4D7A795 & -(fp & 1))
    return fp


def _spec_frame(schema: Any, record: dict[str, Any]) -> bytes:
    """Single-object encoding written from the specification's words: C3 01, little-endian CRC-64-AVRO, body."""
    canonical = to_parsing_canonical_form(schema).encode("utf-8")
    body = io.BytesIO()
    schemaless_writer(body, schema, record)
    return MAGIC + struct.pack("<Q", _bitwise_crc64_avro(canonical)) + body.getvalue()


def test_crc64_avro_matches_the_bitwise_algorithm() -> None:
    for text in (b"", b'"int"', b'{"name":"x","type":"record","fields":[]}', bytes(range(256))):
        assert crc64_avro(text) == _bitwise_crc64_avro(text)


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_type_is_framed_with_the_little_endian_fingerprint(event_type: str) -> None:
    schema = default_codec().registry.current[event_type]
    canonical = to_parsing_canonical_form(schema.parsed)
    assert schema.fingerprint == struct.pack("<Q", _bitwise_crc64_avro(canonical.encode("utf-8")))
    # fastavro gives CRC-64-AVRO as the hex of its little-endian bytes, like Java's parsingFingerprint.
    assert schema.fingerprint.hex() == fingerprint(canonical, "CRC-64-AVRO")


def test_what_polycommit_writes_is_what_the_specification_writes() -> None:
    codec = default_codec()
    alert = {"kind": "stuck", "tx_id": "t-1", "message": "m", "at_ms": 7}
    assert codec.encode("Alert", alert) == _spec_frame(codec.registry.current["Alert"].parsed, alert)


def test_a_record_framed_by_a_stock_library_is_read() -> None:
    codec = default_codec()
    for record in LEGACY:
        schema = codec.registry.current[record["event_type"]]
        if record["writer_version"] != schema.version:
            continue
        decoded = codec.decode(_spec_frame(schema.parsed, record["record"]))
        assert (decoded.event_type, decoded.record, decoded.legacy_byte_order) == (
            record["event_type"],
            record["record"],
            False,
        )


@pytest.mark.parametrize("legacy", LEGACY, ids=lambda e: f"{e['event_type']}.v{e['writer_version']}")
def test_records_written_by_the_old_encoder_are_read_through_the_compatibility_path(legacy: dict[str, Any]) -> None:
    data = bytes.fromhex(legacy["hex"])
    decoded = default_codec().decode(data)
    assert decoded.event_type == legacy["event_type"]
    assert decoded.writer_version == legacy["writer_version"]
    assert decoded.record == legacy["record"]
    assert decoded.legacy_byte_order


def test_the_old_framing_differs_only_by_the_reversed_fingerprint() -> None:
    codec = default_codec()
    for legacy in LEGACY:
        if legacy["writer_version"] != codec.registry.current[legacy["event_type"]].version:
            continue  # an older writer: today's encoder writes the current version, a different body
        old = bytes.fromhex(legacy["hex"])
        new = codec.encode(legacy["event_type"], legacy["record"])
        assert new[HEADER_SIZE:] == old[HEADER_SIZE:]
        assert new[2:HEADER_SIZE] == old[2:HEADER_SIZE][::-1] != old[2:HEADER_SIZE]
        assert old[2:HEADER_SIZE] == legacy_reversed_fingerprint(codec.registry.current[legacy["event_type"]].parsed)


def test_every_writer_is_readable_under_both_byte_orders_and_nothing_else() -> None:
    registry = default_codec().registry
    assert set(registry.readable) == set(registry.writers) | {fp[::-1] for fp in registry.writers}
    for fp, writer in registry.writers.items():
        assert registry.readable[fp] is registry.readable[fp[::-1]] is writer
    alert = default_codec().encode("Alert", {"kind": "k", "tx_id": "t", "message": "m", "at_ms": 1})
    scrambled = MAGIC + alert[3:HEADER_SIZE] + alert[2:3] + alert[HEADER_SIZE:]  # rotated, not reversed
    with pytest.raises(UnknownSchemaError):
        default_codec().decode(scrambled)
