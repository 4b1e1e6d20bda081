"""Avro encoding of every polycommit event, tagged with its writer schema so old events stay readable.

Each record is written in Avro's *single-object encoding* exactly as the specification writes it: the two
marker bytes C3 01, the 8-byte CRC-64-AVRO fingerprint of the writer schema's Parsing Canonical Form in
little-endian order, then the Avro body; so any stock Avro library (Java's `BinaryMessageEncoder` and
`BinaryMessageDecoder`, ...) reads and writes polycommit's events. A reader looks the fingerprint up among
every schema version it knows (the self-contained files shipped in the package under `polycommit/schemas/`,
generated from `schemas/` by `scripts/schemas`; older writers under `history/`) and resolves the body into
the current version of that event type, so a consumer upgraded to a newer schema still reads what older
producers wrote.

Compatibility path: polycommit up to 0.1.0 wrote the fingerprint byte-reversed. Those records are still on
the topics (and copied inside saga snapshots), so every writer is also registered under its reversed
fingerprint (`legacy_reversed_fingerprint`); decoding them costs the same one dict lookup.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, cast

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import to_parsing_canonical_form

from polycommit.avro_writer import Writer, compile_writer
from polycommit.errors import (
    CorruptEventError,
    InvalidEventError,
    UnexpectedEventTypeError,
    UnknownSchemaError,
)

MAGIC = b"\xc3\x01"
HEADER_SIZE = len(MAGIC) + 8
PACKAGED_SCHEMAS = "schemas"  # the folder of package data inside `polycommit`

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
    "OperatorCommand",
    "LockRequest",
    "LockReply",
    "InputPosition",
    "LockPartitionRequest",
    "LockPartitionGrant",
)


def schema_dir() -> Traversable:
    """The shipped self-contained schemas (package data); POLYCOMMIT_SCHEMAS names another such folder."""
    return _location(os.environ.get("POLYCOMMIT_SCHEMAS") or None)


def _location(override: str | None) -> Traversable:
    return Path(override) if override else files("polycommit") / PACKAGED_SCHEMAS


_CRC64_EMPTY = 0xC15D213AA4D7A795  # the specification's fingerprint of the empty string


def _crc64_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        fp = byte
        for _ in range(8):
            fp = (fp >> 1) ^ (_CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return tuple(table)


_CRC64_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The 64-bit Rabin fingerprint the Avro specification calls CRC-64-AVRO."""
    fp = _CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _CRC64_TABLE[(fp ^ byte) & 0xFF]
    return fp


def _fingerprint(schema: Any) -> bytes:
    """The 8 header bytes the specification prescribes: CRC-64-AVRO of the canonical form, little-endian."""
    return struct.pack("<Q", crc64_avro(to_parsing_canonical_form(schema).encode("utf-8")))


def legacy_reversed_fingerprint(schema: Any) -> bytes:
    """The header bytes polycommit <= 0.1.0 wrote: the specification's 8 bytes in reverse order."""
    return _fingerprint(schema)[::-1]


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
    legacy_byte_order: bool = False  # framed by polycommit <= 0.1.0 (fingerprint reversed)


def _history_entries(directory: Traversable) -> list[tuple[str, str, Traversable]]:
    """(event type, version, file) of each `history/polycommit.<Type>.v<N>.avsc`, in name order."""
    history = directory / "history"
    if not history.is_dir():
        return []
    entries = []
    for entry in sorted(history.iterdir(), key=lambda e: e.name):
        stem = entry.name.removeprefix("polycommit.").removesuffix(".avsc")
        if entry.name.startswith("polycommit.") and entry.name.endswith(".avsc") and ".v" in stem:
            event_type, version = stem.rsplit(".v", 1)
            entries.append((event_type, version, entry))
    return entries


class SchemaRegistry:
    """Every shipped schema version, by event type (current) and by fingerprint (all writers).

    `writers` holds each version once, under the specification's fingerprint; `readable` is what `decode`
    looks headers up in: the same writers under both byte orders (the legacy compatibility path).
    """

    def __init__(self, directory: Traversable) -> None:
        self.current: dict[str, WriterSchema] = {}
        self.writers: dict[bytes, WriterSchema] = {}
        for name in EVENT_TYPES:
            raw = json.loads((directory / f"polycommit.{name}.avsc").read_text(encoding="utf-8"))
            schema = self._writer(name, str(raw.get("version", "1")), raw)
            self.current[name] = schema
            self.writers[schema.fingerprint] = schema
        for event_type, version, entry in _history_entries(directory):
            if event_type in self.current:
                schema = self._writer(event_type, version, json.loads(entry.read_text(encoding="utf-8")))
                self.writers.setdefault(schema.fingerprint, schema)
        self.readable: dict[bytes, WriterSchema] = dict(self.writers)
        for schema in self.writers.values():
            # The compatibility path: records framed by polycommit <= 0.1.0 (legacy_reversed_fingerprint).
            # setdefault: were a reversed fingerprint ever equal to another writer's real one, the
            # specification's order wins (new records must never be misread).
            self.readable.setdefault(schema.fingerprint[::-1], schema)

    @staticmethod
    def _writer(event_type: str, version: str, raw: Any) -> WriterSchema:
        parsed = parse_schema(raw)
        return WriterSchema(event_type, version, parsed, _fingerprint(parsed))


class EventCodec:
    """Encode and decode events; raise typed errors for anything that is not a known, intact event."""

    def __init__(self, registry: SchemaRegistry) -> None:
        self.registry = registry
        # Each current schema's generated encoder (polycommit/avro_writer.py) and the header it follows.
        self._fast: dict[str, tuple[bytes, Writer]] = {}
        for event_type, schema in registry.current.items():
            with contextlib.suppress(NotImplementedError):
                self._fast[event_type] = (MAGIC + schema.fingerprint, compile_writer(schema.parsed))

    def encode(self, event_type: str, record: Mapping[str, Any]) -> bytes:
        fast = self._fast.get(event_type)
        if fast is not None:
            try:
                return fast[0] + fast[1](record)
            except Exception:  # not an exact encoding: fastavro below writes it, or raises its own error
                pass
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
        header = bytes(data[2:HEADER_SIZE])
        writer = self.registry.readable.get(header)
        if writer is None:
            raise UnknownSchemaError(f"unknown writer schema fingerprint {header.hex()}")
        reader = self.registry.current[writer.event_type]
        body = io.BytesIO(data)
        body.seek(HEADER_SIZE)
        try:
            if reader is writer:
                record = schemaless_reader(body, writer.parsed, None)
            else:
                record = schemaless_reader(body, writer.parsed, reader.parsed)
        except Exception as exc:  # fastavro raises many kinds on garbage: all mean "corrupt"
            raise CorruptEventError(f"corrupt {writer.event_type} body: {type(exc).__name__}: {exc}") from exc
        if body.tell() != len(data):
            raise CorruptEventError(f"{len(data) - body.tell()} trailing bytes after a {writer.event_type}")
        legacy = header != writer.fingerprint
        return Decoded(writer.event_type, cast(dict[str, Any], record), writer.version, legacy)

    def decode_as(self, data: bytes | None, *expected: str) -> dict[str, Any]:
        decoded = self.decode(data)
        if decoded.event_type not in expected:
            raise UnexpectedEventTypeError(f"expected {' or '.join(expected)}, got {decoded.event_type}")
        return decoded.record


@lru_cache(maxsize=4)
def _codec_for(override: str | None) -> EventCodec:
    return EventCodec(SchemaRegistry(_location(override)))


def default_codec() -> EventCodec:
    """The codec of the shipped schemas (or of the folder POLYCOMMIT_SCHEMAS names), built once."""
    return _codec_for(os.environ.get("POLYCOMMIT_SCHEMAS") or None)
