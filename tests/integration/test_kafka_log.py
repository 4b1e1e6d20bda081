"""The event log on the real broker: Avro records round-trip, aborted Kafka transactions stay invisible."""

from __future__ import annotations

import uuid

from aiokafka import AIOKafkaProducer

from polycommit.bus import Outgoing, Publisher, client_security, make_consumer, read_topic, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings


async def test_an_avro_event_is_produced_consumed_and_decoded(topics: Settings) -> None:
    names = topics_for(topics)
    publisher = Publisher(topics)
    await publisher.start()
    tx_id = str(uuid.uuid4())
    alert = {"kind": "stuck", "tx_id": tx_id, "message": "hello", "at_ms": 1}
    try:
        await publisher.publish_and_wait([Outgoing(names.alerts, tx_id, "Alert", alert)])
        partition = await publisher.partition_for(names.alerts, tx_id)
    finally:
        await publisher.stop()
    consumer = make_consumer(topics, names.alerts, group_id=f"g-{uuid.uuid4().hex}")
    await consumer.start()
    try:
        found = None
        while found is None:
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, "no record arrived within 5 s"
            for records in batch.values():
                for record in records:
                    if record.key == tx_id.encode():
                        found = record
        assert found.partition == partition
        assert default_codec().decode_as(found.value, "Alert") == alert
    finally:
        await consumer.stop()


async def test_an_aborted_kafka_transaction_is_invisible_to_read_committed(topics: Settings) -> None:
    names = topics_for(topics)
    producer = AIOKafkaProducer(
        **client_security(topics), transactional_id=f"test-{uuid.uuid4().hex}", enable_idempotence=True
    )
    await producer.start()
    codec = default_codec()
    aborted, committed = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        for tx_id, commit in ((aborted, False), (committed, True)):
            await producer.begin_transaction()
            value = codec.encode("Alert", {"kind": "x", "tx_id": tx_id, "message": "", "at_ms": 0})
            await producer.send_and_wait(names.alerts, value, key=b"same-key", partition=0)
            if commit:
                await producer.commit_transaction()
            else:
                await producer.abort_transaction()
    finally:
        await producer.stop()
    seen: set[str] = set()
    await read_topic(topics, names.alerts, lambda r: seen.add(codec.decode_as(r.value, "Alert")["tx_id"]), [0])
    assert committed in seen
    assert aborted not in seen
