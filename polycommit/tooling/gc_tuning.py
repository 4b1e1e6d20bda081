"""Garbage-collector settings for the processes polycommit runs itself (never on import: an application
that imports the library keeps its own).

CPython's cyclic collector stops the whole process while it runs. With the default thresholds (700, 10,
10) every part on the path made a full collection of its heap about once per 3 000 sagas at c=32, and a
few gen-1 ones: each held the process 40-85 ms on this 2-core machine (CPU-contended wall time), long
enough to put every transaction in flight at that moment into the p99. Measured by a collector callback in
each process. Nearly all objects on the path die by reference count (decoded records, per-batch dicts),
so the collector has little to find; what it scans is the heap, mostly the modules imported at start.

- `apply()` (at start): young-generation threshold 50 000 instead of 700, so collections are rare and a
  short-lived object is freed by its reference count long before one could promote it.
- `settle()` (once a process is up, its components started): one full collection, then `gc.freeze()`,
  which moves everything alive (modules, classes, clients, pools) out of the collector's sight: later
  collections scan only what was allocated since, a few thousand objects instead of ~70 000.

`POLYCOMMIT_GC=default` keeps CPython's settings (to compare, or to rule this out).
"""

from __future__ import annotations

import gc
import os

YOUNG_THRESHOLD = 50_000


def tuned() -> bool:
    return os.environ.get("POLYCOMMIT_GC", "tuned") != "default"


def apply() -> None:
    """Raise the young generation's threshold for this process (idempotent; no-op with POLYCOMMIT_GC=default)."""
    if tuned():
        gc.set_threshold(YOUNG_THRESHOLD, 10, 10)


def settle() -> None:
    """Once the process is up: collect, then freeze what survives out of every later collection."""
    if tuned():
        gc.collect()
        gc.freeze()
