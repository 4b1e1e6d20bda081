"""The self-contained schemas shipped in the package are generated from schemas/ and load alone anywhere."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from fastavro.schema import load_schema

from polycommit.codec import EVENT_TYPES, PACKAGED_SCHEMAS, _fingerprint, default_codec
from polycommit.tooling.schema_bundle import SchemaBundleError, bundle, self_contained, write_bundle

SOURCE = Path(__file__).resolve().parents[2] / "schemas"
SHIPPED = Path(str(files("polycommit") / PACKAGED_SCHEMAS))


def _shipped_files() -> dict[str, str]:
    return {p.relative_to(SHIPPED).as_posix(): p.read_text(encoding="utf-8") for p in SHIPPED.rglob("*.avsc")}


def test_the_shipped_schemas_are_up_to_date_with_schemas_dir() -> None:
    wanted, shipped = bundle(SOURCE), _shipped_files()
    stale = sorted(name for name in wanted.keys() | shipped.keys() if wanted.get(name) != shipped.get(name))
    assert not stale, f"polycommit/schemas/ is stale ({', '.join(stale)}): run scripts/schemas and commit the result"


def test_one_file_per_event_type_plus_the_history() -> None:
    history = {f"history/{p.name}" for p in (SOURCE / "history").glob("*.avsc")}
    assert set(bundle(SOURCE)) == {f"polycommit.{name}.avsc" for name in EVENT_TYPES} | history


@pytest.mark.parametrize("name", sorted(_shipped_files()))
def test_each_shipped_file_loads_alone_and_keeps_the_source_fingerprint(name: str, tmp_path: Path) -> None:
    alone = tmp_path / Path(name).name
    shutil.copy(SHIPPED / name, alone)  # no sibling files for a parser to find
    parsed = load_schema(str(alone))
    source = load_schema(str(SOURCE / name))  # the multi-file source, resolved by fastavro's file lookup
    assert _fingerprint(parsed) == _fingerprint(source)


def _definitions(schema: Any) -> Iterator[str]:
    if isinstance(schema, dict):
        if schema.get("type") in ("record", "enum", "fixed"):
            yield schema["name"]
        for value in schema.values():
            yield from _definitions(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _definitions(value)


def test_a_type_used_twice_is_defined_once_at_its_first_use() -> None:
    intent = json.loads((SHIPPED / "polycommit.TransactionIntent.avsc").read_text())
    names = list(_definitions(intent))
    assert names.count("Operation") == 1 and names.count("Point") == 1 and names.count("NodeRef") == 1
    step = next(f["type"]["items"] for f in intent["fields"] if f["name"] == "steps")
    operation, compensation = (f["type"] for f in step["fields"] if f["name"] in ("operation", "compensation"))
    assert operation["name"] == "Operation"
    assert compensation == ["null", "polycommit.Operation"]


def test_the_codec_reads_the_package_data_not_the_repository() -> None:
    assert {w.event_type for w in default_codec().registry.current.values()} == set(EVENT_TYPES)
    assert Path(str(files("polycommit"))).resolve() in SHIPPED.resolve().parents


def test_unknown_names_and_misnamed_files_are_refused(tmp_path: Path) -> None:
    fields = [{"name": "b", "type": "polycommit.Missing"}]
    sources: dict[str, dict[str, Any]] = {
        "polycommit.A": {"type": "record", "name": "A", "namespace": "polycommit", "fields": fields}
    }
    with pytest.raises(SchemaBundleError, match="Missing"):
        self_contained("A", sources)
    (tmp_path / "polycommit.Wrong.avsc").write_text(json.dumps(sources["polycommit.A"]))
    with pytest.raises(SchemaBundleError, match=r"polycommit\.A\.avsc"):
        bundle(tmp_path)


def test_write_bundle_writes_what_changed_and_removes_what_is_gone(tmp_path: Path) -> None:
    target = tmp_path / "out"
    (target / "history").mkdir(parents=True)
    (target / "history" / "polycommit.Gone.v1.avsc").write_text("{}")
    changed = write_bundle(SOURCE, target)
    assert "removed history/polycommit.Gone.v1.avsc" in changed
    assert len([c for c in changed if c.startswith("wrote ")]) == len(bundle(SOURCE))
    assert write_bundle(SOURCE, target) == []
