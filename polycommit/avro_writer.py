"""Avro binary encoders generated from the schemas: the same bytes as fastavro's writer, in half the time.

fastavro's writer walks the parsed schema for every record, and pays a dispatch per field: a 3-step saga's
snapshot took ~20 µs to encode (~40 µs on a loaded machine), and encoding was a fifth of the coordinator's
CPU at saturation (`docs/coordinator-positions.md`). `compile_writer` turns a parsed schema into Python
source once, one function per named record with each field's encoding written out, so a record costs a
call per field at most.

Only valid records take this path. The generated code checks nothing fastavro would have let through
differently: whatever it cannot encode exactly (a value of another type, a field missing without default,
a long out of range, a union other than null + one type...) raises, and the caller then encodes the record
with fastavro, which writes the bytes or raises the error it always raised. So the bytes are fastavro's
either way (tests/unit/test_avro_writer.py checks them against fastavro for generated records of every
schema), and fastavro stays the reader and the reference.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

Writer = Callable[[Mapping[str, Any]], bytes]

_PRIMITIVE_ENCODERS = {"int", "long", "boolean", "float", "double", "string", "bytes", "null"}
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1


def _zigzag(n: int) -> bytes:
    if not LONG_MIN <= n <= LONG_MAX:
        raise OverflowError(f"{n} does not fit an Avro long")
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = {n: _zigzag(n) for n in range(-64, 64)}  # one byte each: counts, indexes, small fields


def _long(n: int) -> bytes:
    small = _SMALL.get(n)
    return small if small is not None else _zigzag(n)


def _string(text: str) -> bytes:
    encoded = text.encode()
    return _long(len(encoded)) + encoded


class _Source:
    """The generated module: one function per named record, written once each."""

    def __init__(self) -> None:
        self.functions: dict[str, str] = {}  # record name -> function name
        self.lines: list[str] = []
        self.constants: dict[str, Any] = {}
        self._names = 0

    def fresh(self, stem: str) -> str:
        self._names += 1
        return f"{stem}{self._names}"

    def record(self, schema: Mapping[str, Any]) -> str:
        name = schema["name"]
        if name in self.functions:
            return self.functions[name]
        function = self.functions[name] = self.fresh("w_record_")
        body: list[str] = []
        for field in schema["fields"]:
            value = self.fresh("v")
            body.append(f"{value} = {self._field_value(field)}")
            body.extend(self.value(field["type"], value))
        self.lines.append(f"def {function}(d, a):")
        self.lines.extend(f"    {line}" for line in body or ["pass"])
        self.lines.append("")
        return function

    def _field_value(self, field: Mapping[str, Any]) -> str:
        name = repr(field["name"])
        if "default" in field:
            default = self.fresh("default_")
            self.constants[default] = field["default"]
            return f"d.get({name}, {default})"
        if isinstance(field["type"], list) and "null" in field["type"]:
            return f"d.get({name})"  # fastavro writes a missing nullable field as null
        return f"d[{name}]"

    def value(self, schema: Any, v: str) -> list[str]:
        """Lines that append the encoding of the value named `v`."""
        if isinstance(schema, str):
            if schema in _PRIMITIVE_ENCODERS:
                return self._primitive(schema, v)
            if schema in self.functions:
                return [f"{self.functions[schema]}({v}, a)"]
            raise NotImplementedError(f"named type {schema} used before it is defined")
        if isinstance(schema, list):
            return self._union(schema, v)
        if schema.get("logicalType"):
            raise NotImplementedError(f"logical type {schema['logicalType']}")
        kind = schema["type"]
        if kind == "record":
            return [f"{self.record(schema)}({v}, a)"]
        if kind == "enum":
            symbols = self.fresh("symbols_")
            self.constants[symbols] = {s: _long(i) for i, s in enumerate(schema["symbols"])}
            self.functions[schema["name"]] = self._enum_function(symbols)
            return [f"a({symbols}[{v}])"]
        if kind == "array":
            item = self.fresh("i")
            return self._repeated(v, f"for {item} in {v}:", self.value(schema["items"], item))
        if kind == "map":
            key, item = self.fresh("k"), self.fresh("i")
            body = [f"a(S({key}))", *self.value(schema["values"], item)]
            return self._repeated(v, f"for {key}, {item} in {v}.items():", body)
        if kind in _PRIMITIVE_ENCODERS:
            return self._primitive(kind, v)
        raise NotImplementedError(f"Avro type {kind}")

    def _enum_function(self, symbols: str) -> str:
        function = self.fresh("w_enum_")
        self.lines.extend([f"def {function}(v, a):", f"    a({symbols}[v])", ""])
        return function

    @staticmethod
    def _repeated(v: str, loop: str, body: list[str]) -> list[str]:
        # One block (its count, the items), then the end marker; an empty one is the end marker alone.
        return [f"if {v}:", f"    a(L(len({v})))", f"    {loop}", *(f"        {line}" for line in body), 'a(b"\\x00")']

    def _union(self, branches: list[Any], v: str) -> list[str]:
        if len(branches) != 2 or branches[0] != "null":
            raise NotImplementedError("only unions of null and one type")
        other = self.value(branches[1], v)
        return [f"if {v} is None:", '    a(b"\\x00")', "else:", '    a(b"\\x02")', *(f"    {line}" for line in other)]

    @staticmethod
    def _primitive(kind: str, v: str) -> list[str]:
        return {
            "null": [f"if {v} is not None:", f"    raise TypeError('not null: %r' % ({v},))"],
            "boolean": [f'a(b"\\x01" if {v} else b"\\x00")'],
            "int": [f"a(L({v}))"],
            "long": [f"a(L({v}))"],
            "float": [f"a(F({v}))"],
            "double": [f"a(D({v}))"],
            "string": [f"a(S({v}))"],
            "bytes": [f"a(L(len({v})))", f"a(B({v}))"],
        }[kind]


def _bytes(value: Any) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"not bytes: {type(value).__name__}")
    return bytes(value)


def compile_writer(schema: Mapping[str, Any]) -> Writer:
    """An encoder of records of the parsed (fastavro.parse_schema) record schema; NotImplementedError for
    a schema it cannot encode exactly."""
    source = _Source()
    entry = source.record(schema)
    text = "\n".join(source.lines)
    namespace: dict[str, Any] = {
        "L": _long,
        "S": _string,
        "B": _bytes,
        "F": struct.Struct("<f").pack,
        "D": struct.Struct("<d").pack,
        **source.constants,
    }
    exec(compile(text, f"<avro writer {schema['name']}>", "exec"), namespace)
    record = namespace[entry]

    def write(datum: Mapping[str, Any]) -> bytes:
        out: list[bytes] = []
        record(datum, out.append)
        return b"".join(out)

    return write
