"""What a store consumer commits while its participant holds phase-2 commands back: never past the first
command still held in a partition, and the partition's position again once it is released."""

from __future__ import annotations

from consumers.held import HeldOffsets


def test_a_held_command_caps_its_partition_until_released() -> None:
    held = HeldOffsets()
    held.handled("p0", 11)
    held.handled("p1", 5)
    held.hold(("A", 0, "COMMIT"), "p0", 7)
    held.hold(("B", 0, "COMMIT"), "p0", 9)
    assert held.offsets() == {"p0": 7, "p1": 5}  # A's record is read again after a crash
    held.handled("p0", 20)
    held.release([("A", 0, "COMMIT")])
    assert held.offsets() == {"p0": 9, "p1": 5}
    held.release([("B", 0, "COMMIT"), ("unknown", 1, "ABORT")])
    assert held.offsets() == {"p0": 20, "p1": 5} and len(held) == 0


def test_a_command_held_again_keeps_its_first_offset_and_a_new_session_forgets_all() -> None:
    held = HeldOffsets()
    held.handled("p0", 4)
    held.hold(("A", 0, "COMMIT"), "p0", 2)
    held.hold(("A", 0, "COMMIT"), "p0", 3)  # redelivered within the session: the first one counts
    assert held.offsets() == {"p0": 2}
    held.clear()
    assert held.offsets() == {} and len(held) == 0
