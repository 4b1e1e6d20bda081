"""A producer in another language speaks the wire contract: a Java program on stock Avro and Kafka clients.

scripts/java-client/ holds the program: it parses the schema files polycommit ships (polycommit/schemas/)
with `new Schema.Parser().parse(file)`, frames records with the stock `BinaryMessageEncoder` and reads them
with the stock `BinaryMessageDecoder`. These tests build it (scripts/java-client/build: idempotent, fast once
built), run the coordinator and the store consumers in this process, and fail, never skip, when Java, Maven
or a server is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.bus import make_reader, read_topic, topic_partitions, topics_for
from polycommit.codec import PACKAGED_SCHEMAS, default_codec
from polycommit.config import Settings, load_settings
from polycommit.tooling import workload
from polycommit.tooling.runtime import Runtime

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = Path(str(files("polycommit") / PACKAGED_SCHEMAS))
POLICY = SagaPolicy(default_timeout_ms=5000, backoff_base_ms=100, backoff_max_ms=1000, compensation_retries=3)
pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def java_command(settings: Settings) -> list[str]:
    """`java ... ForeignProducer`, built first (a missing JDK or Maven fails here, with the build's message)."""
    for tool in ("java", "javac", "mvn"):
        assert shutil.which(tool), f"{tool} is not on PATH: scripts/setup installs it"
    env = {**os.environ, "POLYCOMMIT_CACHE": str(settings.cache_dir)}
    build = subprocess.run(
        [str(REPO / "scripts" / "java-client" / "build")], env=env, capture_output=True, text=True, timeout=600
    )
    assert build.returncode == 0, f"scripts/java-client/build failed:\n{build.stdout}\n{build.stderr}"
    out = settings.cache_dir / "java-client"
    classpath = f"{out / 'lib'}/*{os.pathsep}{out / 'classes'}"
    return ["java", "-Dfile.encoding=UTF-8", "-Dsun.stdout.encoding=UTF-8", "-cp", classpath]


def java_environment(settings: Settings) -> dict[str, str]:
    """The Java client authenticates as polycommit's own clients do (the `client` principal, with SASL)."""
    kafka = settings.kafka
    env = {**os.environ, "POLYCOMMIT_KAFKA_SECURITY_PROTOCOL": kafka.security_protocol}
    env["POLYCOMMIT_KAFKA_SASL_MECHANISM"] = kafka.sasl_mechanism
    if kafka.credentials is not None:
        env["POLYCOMMIT_KAFKA_USERNAME"] = kafka.credentials.username
        env["POLYCOMMIT_KAFKA_PASSWORD"] = kafka.credentials.password
    return env


async def run_java(command: list[str], *args: str, timeout: float = 120) -> str:
    """Run the Java client without blocking the event loop the coordinator and consumers run on."""
    process = await asyncio.create_subprocess_exec(
        *command,
        "polycommit.foreign.ForeignProducer",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=java_environment(load_settings().as_role("client")),
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode == 0, f"java {args[0]} exited {process.returncode}:\n{stderr.decode()}"
    return stdout.decode("utf-8")


@pytest.fixture(scope="module")
async def runtime(topics: Settings, java_command: list[str]) -> AsyncIterator[Runtime]:
    # Depends on java_command so the (blocking) build finishes before the parts start heartbeating.
    await workload.prepare_postgres(topics)
    rt = Runtime(topics, stores=("postgres", "neo4j"), policy=POLICY, batch_size=200)
    await rt.start()
    yield rt
    await rt.stop()


async def reply_partition(settings: Settings) -> tuple[str, int]:
    topic = topics_for(settings).replies
    reader = make_reader(settings, "java-test")
    await reader.start()
    try:
        partitions = await topic_partitions(reader, topic)
    finally:
        await reader.stop()
    return topic, partitions[-1].partition


def foreign_steps(doc: str) -> list[dict[str, str]]:
    """A postgres upsert_row and a neo4j merge_node, JSON text written as a Java JSON library writes it:
    spaces, its own key order, raw non-ASCII. Saga steps apply correctly from any spelling; their lock keys
    match the SDK's only once the coordinator runs polycommit.canonical.canonical_intent on arrival."""
    return [
        {
            "store": "postgres",
            "kind": "upsert_row",
            "target": workload.DOCUMENTS,
            "key": f'{{ "id" : "{doc}" }}',
            "values": '{ "title" : "Grüße from Java", "body" : "stock Avro" }',
        },
        {
            "store": "neo4j",
            "kind": "merge_node",
            "target": "Document",
            "key": f'{{"id": "{doc}"}}',
            "values": '{"title": "Grüße from Java", "source": "java"}',
        },
    ]


async def send_from_java(
    java_command: list[str], settings: Settings, steps: list[dict[str, str]], tmp_path: Path
) -> tuple[str, dict[str, Any]]:
    """Publish an intent of `steps` from Java; (its tx id, the TransactionResult Java received, as JSON)."""
    tx_id = str(uuid.uuid4())
    (tmp_path / "steps.json").write_text(json.dumps(steps, ensure_ascii=False), encoding="utf-8")
    replies, partition = await reply_partition(settings)
    printed = await run_java(
        java_command,
        "send",
        *("--schemas", str(SCHEMAS), "--bootstrap", settings.kafka.bootstrap),
        *("--intents", topics_for(settings).intents, "--replies", replies, "--partition", str(partition)),
        *("--tx-id", tx_id, "--steps", str(tmp_path / "steps.json"), "--timeout-ms", "90000"),
    )
    return tx_id, json.loads(printed)


async def test_a_java_intent_completes_and_both_stores_show_its_writes(
    runtime: Runtime, java_command: list[str], tmp_path: Path
) -> None:
    settings = runtime.settings
    doc = f"d-java-{uuid.uuid4().hex[:8]}"
    tx_id, result = await send_from_java(java_command, settings, foreign_steps(doc), tmp_path)
    assert result["tx_id"] == tx_id
    assert result["status"] == "COMPLETED", result
    assert [(s["store"], s["status"]) for s in result["steps"]] == [("postgres", "applied"), ("neo4j", "applied")]
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        row = await conn.fetchrow(f"SELECT title, body FROM {workload.DOCUMENTS} WHERE id = $1", doc)
    finally:
        await conn.close()
    assert row is not None and dict(row) == {"title": "Grüße from Java", "body": "stock Avro"}
    node = await runtime.workers["neo4j"].participant.read_node("Document", {"id": doc})  # type: ignore[attr-defined]
    assert node is not None and (node["title"], node["source"]) == ("Grüße from Java", "java")


async def test_java_decodes_a_transaction_result_written_by_python(java_command: list[str], tmp_path: Path) -> None:
    error = {"error_class": "StoreError", "message": "constraint “documents_pkey” violated", "retriable": True}
    result: dict[str, Any] = {
        "tx_id": str(uuid.uuid4()),
        "name": "python-wrote-this",
        "status": "COMPENSATED",
        "steps": [
            {
                "index": 0,
                "name": "postgres.upsert_row",
                "store": "postgres",
                "status": "compensated",
                "attempts": 1,
                "compensation_attempts": 2,
                "error": None,
                "compensation_error": None,
                "resolved_by": "",
            },
            {
                "index": 1,
                "name": "neo4j.merge_node",
                "store": "neo4j",
                "status": "failed",
                "attempts": 3,
                "compensation_attempts": 0,
                "error": error,
                "compensation_error": None,
                "resolved_by": "",
            },
        ],
        "error": error,
        "started_at_ms": 1_764_300_000_000,
        "finished_at_ms": 1_764_300_000_123,
    }
    (tmp_path / "result.bin").write_bytes(default_codec().encode("TransactionResult", result))
    printed = await run_java(
        java_command, "decode-result", "--schemas", str(SCHEMAS), "--file", str(tmp_path / "result.bin")
    )
    assert json.loads(printed) == result


async def test_java_loads_every_shipped_schema_alone_and_agrees_on_its_fingerprint(java_command: list[str]) -> None:
    paths = sorted(str(p) for p in SCHEMAS.rglob("*.avsc"))  # noqa: ASYNC240 (a dozen names, before any I/O)
    printed = await run_java(java_command, "fingerprints", *paths)
    java = {line.split("\t")[0]: line.split("\t")[2] for line in printed.splitlines()}
    registry = default_codec().registry
    python = {}
    for fp, writer in registry.writers.items():
        current = registry.current[writer.event_type] is writer
        name = writer.event_type if current else f"{writer.event_type}.v{writer.version}"
        python[f"polycommit.{name}.avsc"] = fp.hex()
    assert java == python
    # The header polycommit writes carries exactly these bytes (the specification's little-endian order).
    alert = default_codec().encode("Alert", {"kind": "k", "tx_id": "t", "message": "m", "at_ms": 1})
    assert alert[2:10].hex() == java["polycommit.Alert.avsc"]


async def test_the_commands_of_a_java_intent_carry_the_sdk_canonical_json(
    runtime: Runtime, java_command: list[str], tmp_path: Path
) -> None:
    doc = f"d-java-{uuid.uuid4().hex[:8]}"
    tx_id, result = await send_from_java(java_command, runtime.settings, foreign_steps(doc), tmp_path)
    assert result["status"] == "COMPLETED", result
    commands: list[dict[str, Any]] = []
    codec = default_codec()

    def keep(record: Any) -> None:
        if record.key == tx_id.encode():
            commands.append(codec.decode_as(record.value, "StoreCommand"))

    await read_topic(runtime.settings, topics_for(runtime.settings).commands("postgres"), keep)
    sdk = ops.upsert_row(workload.DOCUMENTS, {"id": doc}, {"title": "Grüße from Java", "body": "stock Avro"})
    assert [c["operation"] for c in commands] == [sdk]
