"""The garbage collector of a serving process: the start-up heap frozen, young collections rarer.

Python's cyclic collector walks every tracked object of a generation on each of its
collections. A started service holds a large heap that lives as long as the process (modules,
FastAPI's routes and pydantic's validators, SQLAlchemy's tables and compiled statements, the
clients); with the interpreter's defaults each full collection walked all of it while the
pipeline ran (~120 ms each on the benches' VM), and a young collection ran every 700
allocations. ``tune`` runs once per process, at the end of the first start-up:

- ``gc.freeze()`` moves everything alive then to the permanent generation, which collections
  skip (the Python documentation recommends it for a server's start-up heap);
- ``gc.set_threshold(gen0, …)`` makes young collections rarer (``REGSTREAM_GC_GEN0_THRESHOLD``,
  default 10,000; the older generations' thresholds are kept). Garbage without cycles is freed
  by reference counting as before; cycles wait a little longer.

``bench/RESULTS.md`` run 17 measures it on the pipeline. ``REGSTREAM_GC_GEN0_THRESHOLD=0``
leaves the collector as the interpreter set it.
"""

from __future__ import annotations

import gc
import logging
import threading

__all__ = ["tune"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_tuned = False


def tune(gen0_threshold: int) -> bool:
    """Freeze the heap alive now and set the young generation's threshold, once per process
    (a test process starts many apps: only the first one's heap is frozen). True if this call
    did it."""
    global _tuned
    if gen0_threshold <= 0:
        return False
    with _lock:
        if _tuned:
            return False
        _tuned = True
    gc.collect()  # what is garbage now is not frozen
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
    log.info(
        "garbage collector: %d start-up objects frozen, young generation threshold %d",
        gc.get_freeze_count(),
        gen0_threshold,
    )
    return True
