"""The library an application installs stands alone: its client API loads no store adapter, no orchestrator
and no tooling, and leaves aiokafka as aiokafka ships it.

Checked in a fresh interpreter: this test process has imported much more (and tests/conftest.py applies
polycommit's aiokafka tuning), so only a new one shows what importing the library alone does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FOREIGN = ("consumers", "orchestrator", "polycommit.tooling")

# Imports the client API the README shows, then reports what the interpreter loaded and the value of the
# aiokafka constant that polycommit's own processes tune, next to aiokafka's value read from its source.
PROBE = """
import ast, inspect, json, sys

import polycommit
polycommit.connect
polycommit.transaction
from polycommit import Saga, Transaction, ops

from aiokafka.producer import sender
from opentelemetry import trace

shipped = None
for node in ast.parse(inspect.getsource(sender)).body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "BACKOFF_OVERRIDE" for t in node.targets):
        shipped = ast.literal_eval(node.value)
print(json.dumps({
    "modules": sorted(sys.modules),
    "backoff": sender.BACKOFF_OVERRIDE,
    "tracer_provider": type(trace.get_tracer_provider()).__name__,
    "shipped": shipped,
    "api": [callable(polycommit.connect), callable(polycommit.transaction), Saga.__name__, Transaction.__name__,
            ops.__name__],
}))
"""


def _probe() -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    return report


def test_the_client_api_imports_no_adapter_orchestrator_or_tooling() -> None:
    report = _probe()
    assert report["api"] == [True, True, "Saga", "Transaction", "polycommit.operations"]
    modules = report["modules"]
    assert isinstance(modules, list)
    assert "polycommit.client" in modules  # the probe did load the library
    loaded = [m for m in modules if any(m == name or m.startswith(f"{name}.") for name in FOREIGN)]
    assert not loaded, f"importing polycommit's client API loaded {loaded}"


def test_importing_the_library_configures_no_tracing() -> None:
    """polycommit.tracing only uses the OpenTelemetry API: the global provider stays the API's no-op proxy
    (an application's own configuration wins), and the SDK and exporters are not even loaded."""
    report = _probe()
    assert report["tracer_provider"] == "ProxyTracerProvider"
    modules = report["modules"]
    assert isinstance(modules, list)
    assert "polycommit.tracing" in modules
    assert not [m for m in modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))]


def test_importing_the_library_leaves_aiokafka_untouched() -> None:
    report = _probe()
    assert report["shipped"] is not None, "aiokafka's sender no longer defines BACKOFF_OVERRIDE"
    assert report["backoff"] == report["shipped"]


def test_polycommit_processes_apply_the_tuning_on_demand() -> None:
    """The other half: the tooling's `apply()` does change the constant, idempotently, in its own process."""
    probe = (
        "from aiokafka.producer import sender\n"
        "from polycommit.tooling import kafka_tuning\n"
        "before = sender.BACKOFF_OVERRIDE\n"
        "kafka_tuning.apply(); kafka_tuning.apply()\n"
        "tuned = kafka_tuning.CONCURRENT_TRANSACTIONS_BACKOFF_S\n"
        "print(before, sender.BACKOFF_OVERRIDE, tuned, kafka_tuning.applied())\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    before, after, tuned, applied = done.stdout.split()
    assert float(before) != float(tuned)
    assert float(after) == float(tuned)
    assert applied == "True"
