"""Turn the source schemas in `schemas/` into the self-contained schema files polycommit ships as package data.

In `schemas/` each file defines one named type and refers to the others by name, which only a parser that
is handed every file in the right order can load. A producer in another language needs one file per event
type that any stock parser loads with one call (Java's `new Schema.Parser().parse(file)`, fastavro's
`load_schema`), so the bundle inlines every named type at its first use and leaves later uses as names,
exactly as Avro's Parsing Canonical Form does. `schemas/` stays the source of truth: run `scripts/schemas`
after changing it; tests/unit/test_schema_bundle.py fails while the shipped files are stale.
"""

from __future__ import annotations

import argparse
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from polycommit.codec import EVENT_TYPES, PACKAGED_SCHEMAS

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
NAMED = frozenset({"record", "error", "enum", "fixed"})


class SchemaBundleError(ValueError):
    """The source schemas cannot be bundled: an unknown name, a type defined twice, a misnamed file."""


def _full_name(name: str, namespace: str) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


def load_sources(directory: Path) -> dict[str, dict[str, Any]]:
    """Every named type defined at the top of a `schemas/*.avsc` file, by full name (= the file's stem)."""
    sources: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.avsc")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        full = _full_name(schema["name"], schema.get("namespace", ""))
        if full != path.stem:
            raise SchemaBundleError(f"{path.name} defines {full}; the file must be named {full}.avsc")
        sources[full] = schema
    return sources


def _inline(schema: Any, namespace: str, sources: dict[str, dict[str, Any]], defined: set[str]) -> Any:
    """`schema` with every named type it uses defined at first use, depth first in document order."""
    if isinstance(schema, str):
        if schema in PRIMITIVES:
            return schema
        full = _full_name(schema, namespace)
        if full in defined:
            return full
        if full not in sources:
            raise SchemaBundleError(f"unknown type {schema!r} (no schemas/{full}.avsc)")
        return _inline(sources[full], full.rpartition(".")[0], sources, defined)
    if isinstance(schema, list):
        return [_inline(branch, namespace, sources, defined) for branch in schema]
    if not isinstance(schema, dict):
        raise SchemaBundleError(f"not a schema: {schema!r}")
    kind, out = schema["type"], dict(schema)
    if kind in NAMED:
        full = _full_name(schema["name"], schema.get("namespace", namespace))
        if full in defined:
            raise SchemaBundleError(f"type {full} is defined twice")
        defined.add(full)  # before the fields: a record may refer to itself
        inner = full.rpartition(".")[0]
        if kind in ("record", "error"):
            out["fields"] = [{**f, "type": _inline(f["type"], inner, sources, defined)} for f in schema["fields"]]
    elif kind == "array":
        out["items"] = _inline(schema["items"], namespace, sources, defined)
    elif kind == "map":
        out["values"] = _inline(schema["values"], namespace, sources, defined)
    elif kind not in PRIMITIVES:
        raise SchemaBundleError(f"unsupported schema form {schema!r}")
    return out


def self_contained(type_name: str, sources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The schema of `polycommit.<type_name>` with every type it uses inlined: loads alone anywhere."""
    result: dict[str, Any] = _inline(f"polycommit.{type_name}", "", sources, set())
    return result


def _text(schema: Any) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def bundle(source: Path) -> dict[str, str]:
    """What the package ships: relative path -> file text, one file per event type plus the history."""
    sources = load_sources(source)
    shipped = {f"polycommit.{name}.avsc": _text(self_contained(name, sources)) for name in EVENT_TYPES}
    for path in sorted((source / "history").glob("polycommit.*.v*.avsc")):
        # A history file is an old writer schema, already self-contained: inlining only checks that it is.
        schema = _inline(json.loads(path.read_text(encoding="utf-8")), "", {}, set())
        shipped[f"history/{path.name}"] = _text(schema)
    return shipped


def write_bundle(source: Path, target: Path) -> list[str]:
    """Write the bundle into `target`, removing shipped .avsc files it no longer holds; returns what changed."""
    wanted = bundle(source)
    changed: list[str] = []
    for old in sorted(target.rglob("*.avsc")):
        relative = old.relative_to(target).as_posix()
        if relative not in wanted:
            old.unlink()
            changed.append(f"removed {relative}")
    for relative, text in wanted.items():
        path = target / relative
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            changed.append(f"wrote {relative}")
    return changed


def main(argv: list[str] | None = None) -> int:
    repo = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--source", type=Path, default=repo / "schemas")
    parser.add_argument("--target", type=Path, default=Path(str(files("polycommit") / PACKAGED_SCHEMAS)))
    args = parser.parse_args(argv)
    for line in write_bundle(args.source, args.target) or ["up to date"]:
        print(f"schemas: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
