"""The benchmark's CPU meter: /proc's fields read right, and a part's CPU per transaction from two samples."""

from __future__ import annotations

import os
import time

from polycommit.tooling.cpu_meter import CpuMeter, Sample, cpu_report, machine_ticks, process_ticks, with_children


def test_a_stat_line_is_read_from_after_the_command_name_whatever_it_holds() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    line = "4242 (python (worker) x) S 17 4242 4242 0 -1 4194560 900 0 0 0 250 50 3 1 20 0 1 0"
    assert process_ticks(line) == (17, 300)


def test_machine_ticks_count_idle_and_iowait_as_not_busy() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    assert machine_ticks("cpu  100 5 20 300 10 1 2 3 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n") == (131, 441)


def test_the_report_divides_each_parts_ticks_among_the_transactions() -> None:
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    before = Sample({("coordinator", 10): 100, ("kafka", 20): 50, ("postgres server", 31): 5}, busy=1000, total=4000)
    after = Sample(
        # postgres: a backend that began during the point counts from zero; the one that ended counts nothing
        {("coordinator", 10): 300, ("kafka", 20): 150, ("postgres server", 32): 40},
        busy=1700,
        total=5000,
    )
    report = cpu_report(before, after, transactions=100, cores=2)
    assert report["ms_per_tx"] == {
        "coordinator": round(200 * tick_ms / 100, 3),
        "kafka": round(100 * tick_ms / 100, 3),
        "postgres server": round(40 * tick_ms / 100, 3),
    }
    assert report["total_ms_per_tx"] == round(340 * tick_ms / 100, 3)
    assert report["machine_busy_cores"] == 1.4  # 700 busy of 1000 ticks, on 2 cores
    assert report["parts_busy_cores"] == 0.68
    assert report["ceiling_tps"] == round(2 * 1000 / (340 * tick_ms / 100))


def test_a_busy_process_is_measured_and_its_children_found() -> None:
    meter = CpuMeter({"me": lambda: [os.getpid()]})
    before = meter.sample()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn CPU, the quantity measured
        pass
    report = meter.per_transaction(before, meter.sample(), transactions=1)
    assert report["ms_per_tx"]["me"] >= 200
    assert os.getpid() in with_children(os.getppid())
    assert with_children(None) == []
