"""The partitioned lock manager's records (orchestrator/lock_partitions.py, the end): a request, a release
and an answer survive the codec unchanged, and a record that contradicts where it travels is refused with a
typed error (the service makes it a dead letter)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from orchestrator.lock_partitions import (
    PartitionGrant,
    PartitionRelease,
    PartitionRequest,
    grant_of,
    grant_record,
    message_of,
    release_record,
    request_record,
)
from orchestrator.locks import EXCLUSIVE, SHARED
from polycommit.codec import default_codec
from polycommit.errors import InvalidEventError


def through_the_codec(event_type: str, record: Mapping[str, Any]) -> Any:
    codec = default_codec()
    return codec.decode_as(codec.encode(event_type, record), event_type)


def test_a_request_and_a_release_survive_the_wire() -> None:
    request = PartitionRequest("t1", 2, (("neo4j:Person:a", SHARED), ("postgres:docs:b", EXCLUSIVE)), 1234)
    decoded = through_the_codec("LockPartitionRequest", request_record(request, at_ms=5))
    assert message_of(decoded, 2) == request
    release = PartitionRelease("t1", 2)
    assert message_of(through_the_codec("LockPartitionRequest", release_record(release, 6)), 2) == release


def test_an_answer_survives_the_wire() -> None:
    for grant in (PartitionGrant("t1", 0, True), PartitionGrant("t2", 3, False, ("t1", "t0"))):
        assert grant_of(through_the_codec("LockPartitionGrant", grant_record(grant, 7))) == grant


def test_a_request_read_from_another_partition_or_naming_no_key_is_refused() -> None:
    request = request_record(PartitionRequest("t1", 1, (("k", EXCLUSIVE),)), 0)
    with pytest.raises(InvalidEventError, match="partition 1 was read from partition 0"):
        message_of(request, 0)
    with pytest.raises(InvalidEventError, match="names no key"):
        message_of({**request, "keys": []}, 1)
