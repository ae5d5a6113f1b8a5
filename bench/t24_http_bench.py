"""T24 client CPU per call over aiohttp, one process (issue 17; goal below).

  .venv/bin/python bench/t24_http_bench.py            # 5 reps of 2,000 GETs per variant

Starts the T24 simulator (``regstream t24-sim --latency-ms 0``, pinned to CPU 1) and, in this
process (pinned to CPU 0, uvloop), sends GETs for load customers (``7nnnnnnnnn``) with
``--concurrency`` in flight. Variants, interleaved rep by rep (order alternating):

- ``aiohttp``: ``aiohttp.ClientSession.get`` + ``json.loads`` of the body, with the T24 headers
  and a pool as large as the concurrency: the transport ``T24Client`` uses;
- ``httpx``: ``httpx.AsyncClient.get`` + ``json.loads``, the same way (the library issue 17
  named first; run 14 shows why the client does not use it);
- ``t24client``: ``T24Client.get_customer`` as the pipeline calls it (aiohttp, the breaker,
  the call deadline, tenacity around every attempt, wire parsing, one log line and metrics per
  attempt);
- ``baseline`` (with ``--baseline TREE``): the same, with the ``T24Client`` of another source
  tree (``git archive HEAD src/regstream/core_banking | tar -x -C TREE``), loaded as a
  separate package: a change to the client measured against the code before it, in one run.

``time.process_time()`` around each rep gives this process's CPU per GET (the simulator's is not
counted). Each variant checks its answers (status 200, the customer asked for). Prints per variant
the reps and the median µs per GET and the ratios t24client/aiohttp (what the client adds over
its transport) and httpx/aiohttp (medians of per-rep ratios), and appends one JSON line to
--out. Goal (issue 17's throughput targets): ``t24client_over_aiohttp`` <= 1.25. The service's
logging is configured as in production (INFO, redaction filter, text format, to /dev/null), so
``t24client`` pays what a call's logging costs there (a successful attempt's line is DEBUG: no
line; a failed one's would be written); ``aiohttp`` and ``httpx`` log nothing. The garbage
collector is tuned as a started service tunes it (``gc_tuning.tune``: the heap frozen once the
clients exist, young collections every 10,000 allocations, ``REGSTREAM_GC_GEN0_THRESHOLD``'s
default) unless ``--no-gc-tuning``: with the interpreter's defaults a young collection runs every
~20 GETs and adds ~5 % (16 in flight) to ~13 % (256) to ``t24client``'s CPU per GET, a cost the
service does not pay (each call leaves tenacity's ``Retrying`` as a reference cycle).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import httpx
import uvloop
from procs import Child, free_port, wait_port

from regstream import gc_tuning, logs
from regstream.core_banking import T24Client, T24ClientConfig

HEADERS = {"Accept": "application/json", "companyId": "GB0010001"}
GC_GEN0_THRESHOLD = 10_000  # REGSTREAM_GC_GEN0_THRESHOLD's default


def _customer(i: int) -> str:
    return f"7{i % 1_000_000_000:09d}"


def _load_baseline(tree: str, into: str) -> Any:
    """``T24Client`` of ``tree``'s ``src/regstream/core_banking``, as package ``t24_baseline``
    (written under ``into``; its imports of ``regstream.core_banking`` rewritten to it)."""
    source = os.path.join(tree, "src", "regstream", "core_banking")
    package = os.path.join(into, "t24_baseline")
    os.makedirs(package)
    for name in os.listdir(source):
        if name.endswith(".py"):
            with open(os.path.join(source, name)) as f:
                text = f.read().replace("regstream.core_banking", "t24_baseline")
            with open(os.path.join(package, name), "w") as f:
                f.write(text)
    sys.path.insert(0, into)
    return importlib.import_module("t24_baseline.client")


async def _rep(get: Callable[[int], Awaitable[None]], n: int, concurrency: int) -> float:
    """CPU µs per GET over ``n`` GETs, ``concurrency`` in flight."""
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            await get(i)

    start = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - start) / n * 1e6


async def _main(args: argparse.Namespace, base: str, old: Any) -> dict[str, object]:
    prefix = "/api/v1.0.0"
    session = httpx.AsyncClient(
        headers=HEADERS,
        trust_env=False,
        limits=httpx.Limits(
            max_connections=args.concurrency, max_keepalive_connections=args.concurrency
        ),
    )
    t24 = T24Client(T24ClientConfig(base_url=base + prefix, max_connections=args.concurrency))
    t24_old = (
        old.T24Client(old.T24ClientConfig(base_url=base + prefix, max_connections=args.concurrency))
        if old is not None
        else None
    )
    aio = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=args.concurrency),
        headers=HEADERS,
        cookie_jar=aiohttp.DummyCookieJar(),
    )

    def check(status: int, body: bytes, i: int) -> None:
        if status != 200 or json.loads(body)["body"]["customerId"] != _customer(i):
            raise SystemExit(f"unexpected answer {status} for {_customer(i)}")

    async def httpx_get(i: int) -> None:
        r = await session.get(
            f"{base}{prefix}/party/customers/{_customer(i)}",
            headers={"X-Correlation-ID": os.urandom(16).hex()},
        )
        check(r.status_code, r.content, i)

    async def aiohttp_get(i: int) -> None:
        async with aio.get(
            f"{base}{prefix}/party/customers/{_customer(i)}",
            headers={"X-Correlation-ID": os.urandom(16).hex()},
        ) as r:
            check(r.status, await r.read(), i)

    async def t24client(i: int) -> None:
        customer = await t24.get_customer(_customer(i))
        if customer.customer_id != _customer(i):
            raise SystemExit("wrong customer")

    async def baseline(i: int) -> None:
        assert t24_old is not None
        customer = await t24_old.get_customer(_customer(i))
        if customer.customer_id != _customer(i):
            raise SystemExit("wrong customer")

    variants: dict[str, Callable[[int], Awaitable[None]]] = {
        "aiohttp": aiohttp_get, "httpx": httpx_get, "t24client": t24client,
    }  # fmt: skip
    if t24_old is not None:
        variants["baseline"] = baseline
    if args.skip_httpx:
        del variants["httpx"]
    if args.gc_tuning:
        gc_tuning.tune(GC_GEN0_THRESHOLD)  # the clients exist: the service's start-up is over
    for get in variants.values():  # warm-up: connections, caches
        await _rep(get, min(500, args.n), args.concurrency)
    results: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            results[name].append(await _rep(variants[name], args.n, args.concurrency))
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()))
    await session.aclose()
    await aio.close()
    await t24.aclose()
    if t24_old is not None:
        await t24_old.aclose()

    def ratio(a: str, b: str) -> float:
        return round(
            statistics.median(x / y for x, y in zip(results[a], results[b], strict=True)), 3
        )

    ratios = {"t24client_over_aiohttp": ratio("t24client", "aiohttp")}
    if "httpx" in results:
        ratios["httpx_over_aiohttp"] = ratio("httpx", "aiohttp")
    if "baseline" in results:
        ratios["baseline_over_aiohttp"] = ratio("baseline", "aiohttp")
        ratios["t24client_over_baseline"] = ratio("t24client", "baseline")
    return {
        "bench": "t24_http",
        "baseline": args.baseline,
        "n": args.n,
        "concurrency": args.concurrency,
        "reps": args.reps,
        "gc_tuning": args.gc_tuning,
        "us_per_get": {k: [round(x, 1) for x in v] for k, v in results.items()},
        "median_us_per_get": {k: round(statistics.median(v), 1) for k, v in results.items()},
        **ratios,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=2000, help="GETs per variant per rep")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=32, help="GETs in flight")
    ap.add_argument("--out", default="bench/results/t24_http.jsonl")
    ap.add_argument("--baseline", metavar="TREE", help="also time TREE's T24Client (see above)")
    ap.add_argument("--skip-httpx", action="store_true", help="leave the httpx variant out")
    ap.add_argument(
        "--no-gc-tuning", dest="gc_tuning", action="store_false",
        help="leave the garbage collector as the interpreter sets it (see above)",
    )  # fmt: skip
    args = ap.parse_args()
    # The service's logging (redaction filter, text format), written to /dev/null: the T24
    # client's log line per attempt is part of what t24client measures.
    logs.configure("INFO")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(open(os.devnull, "w"))  # noqa: SIM115
    os.sched_setaffinity(0, {0})
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "regstream")
    with tempfile.TemporaryDirectory() as logdir:
        old = _load_baseline(args.baseline, logdir) if args.baseline else None
        sim = Child(
            "t24-sim", [exe, "t24-sim", "--port", str(port), "--latency-ms", "0"], {1}, logdir
        )
        try:
            wait_port(port, sim, 30)
            result = uvloop.run(_main(args, f"http://127.0.0.1:{port}", old))
        finally:
            sim.stop()
    print(json.dumps(result, indent=1))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
