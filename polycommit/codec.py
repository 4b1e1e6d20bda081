"""Avro encoding of every polycommit event, tagged with its writer schema so old events stay readable.

Each record is written in Avro's *single-object encoding*: the two marker bytes C3 01, the 8-byte
CRC-64-AVRO fingerprint of the writer schema (little-endian), then the Avro body. A reader looks the
fingerprint up among every schema version it knows (`schemas/*.avsc` for the current ones,
`schemas/history/` for older writers) and resolves the body into the current version of that event type,
so a consumer upgraded to a newer schema still reads what older producers wrote.
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, load_schema, to_parsing_canonical_form

from polycommit.config import REPO_ROOT
from polycommit.errors import (
    CorruptEventError,
    InvalidEventError,
    UnexpectedEventTypeError,
    UnknownSchemaError,
)

MAGIC = b"\xc3\x01"
HEADER_SIZE = len(MAGIC) + 8

# The top-level event types: each is published on its own topics. The other schema files are shared parts.
EVENT_TYPES = (
    "TransactionIntent",
    "StoreCommand",
    "StepOutcome",
    "Decision",
    "LockEvent",
    "DeadlockVerdict",
    "DeadLetter",
    "TransactionResult",
    "SagaSnapshot",
    "Alert",
)


def schema_dir() -> Path:
    return Path(os.environ.get("POLYCOMMIT_SCHEMAS", str(REPO_ROOT / "schemas")))


def _fingerprint(schema: Any) -> bytes:
    hex_digest = fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")
    # The spec writes the 64-bit fingerprint little-endian; fastavro gives it as big-endian hex.
    return struct.pack("<Q", int(hex_digest, 16))


@dataclass(frozen=True)
class WriterSchema:
    event_type: str
    version: str
    parsed: Any
    fingerprint: bytes


@dataclass(frozen=True)
class Decoded:
    event_type: str
    record: dict[str, Any]
    writer_version: str


class SchemaRegistry:
    """Every schema version on disk, by event type (current) and by fingerprint (all writers)."""

    def __init__(self, directory: Path) -> None:
        self.current: dict[str, WriterSchema] = {}
        self.writers: dict[bytes, WriterSchema] = {}
        for name in EVENT_TYPES:
            path = directory / f"polycommit.{name}.avsc"
            parsed = load_schema(str(path))
            version = str(parsed.get("version", "1")) if isinstance(parsed, dict) else "1"
            schema = WriterSchema(name, version, parsed, _fingerprint(parsed))
            self.current[name] = schema
            self.writers[schema.fingerprint] = schema
        for path in sorted((directory / "history").glob("polycommit.*.v*.avsc")):
            # History files hold an older writer schema in parsing canonical form (self-contained).
            event_type, version = path.name.removeprefix("polycommit.").removesuffix(".avsc").rsplit(".v", 1)
            if event_type not in self.current:
                continue
            parsed = parse_schema(json.loads(path.read_text()))
            schema = WriterSchema(event_type, version, parsed, _fingerprint(parsed))
            self.writers.setdefault(schema.fingerprint, schema)


class EventCodec:
    """Encode and decode events; raise typed errors for anything that is not a known, intact event."""

    def __init__(self, registry: SchemaRegistry) -> None:
        self.registry = registry

    def encode(self, event_type: str, record: Mapping[str, Any]) -> bytes:
        try:
            schema = self.registry.current[event_type]
        except KeyError:
            raise UnknownSchemaError(f"no schema for event type {event_type!r}") from None
        buffer = io.BytesIO()
        buffer.write(MAGIC)
        buffer.write(schema.fingerprint)
        try:
            schemaless_writer(buffer, schema.parsed, record)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise InvalidEventError(f"{event_type} does not match its schema: {exc}") from exc
        return buffer.getvalue()

    def decode(self, data: bytes | None) -> Decoded:
        if data is None or len(data) < HEADER_SIZE or data[:2] != MAGIC:
            raise CorruptEventError("not a polycommit event: missing single-object header")
        writer = self.registry.writers.get(bytes(data[2:HEADER_SIZE]))
        if writer is None:
            raise UnknownSchemaError(f"unknown writer schema fingerprint {bytes(data[2:HEADER_SIZE]).hex()}")
        reader = self.registry.current[writer.event_type]
        body = io.BytesIO(data)
        body.seek(HEADER_SIZE)
        try:
            if reader.fingerprint == writer.fingerprint:
                record = schemaless_reader(body, writer.parsed, None)
            else:
                record = schemaless_reader(body, writer.parsed, reader.parsed)
        except Exception as exc:  # fastavro raises many kinds on garbage: all mean "corrupt"
            raise CorruptEventError(f"corrupt {writer.event_type} body: {type(exc).__name__}: {exc}") from exc
        if body.tell() != len(data):
            raise CorruptEventError(f"{len(data) - body.tell()} trailing bytes after a {writer.event_type}")
        return Decoded(writer.event_type, cast(dict[str, Any], record), writer.version)

    def decode_as(self, data: bytes | None, *expected: str) -> dict[str, Any]:
        decoded = self.decode(data)
        if decoded.event_type not in expected:
            raise UnexpectedEventTypeError(f"expected {' or '.join(expected)}, got {decoded.event_type}")
        return decoded.record


@lru_cache(maxsize=4)
def _codec_for(directory: str) -> EventCodec:
    return EventCodec(SchemaRegistry(Path(directory)))


def default_codec() -> EventCodec:
    return _codec_for(str(schema_dir()))
