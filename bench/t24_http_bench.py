"""T24 transport micro-benchmark: client CPU per GET, our HttpClient vs aiohttp, one process.

  .venv/bin/python bench/t24_http_bench.py            # 5 reps of 2,000 GETs per variant

Starts the T24 simulator (``regstream t24-sim --latency-ms 0``, pinned to CPU 1) and, in this
process (pinned to CPU 0, uvloop), sends GETs for load customers (``7nnnnnnnnn``) with
``--concurrency`` in flight. Variants, interleaved rep by rep (order alternating):

- ``httpclient``: ``regstream.core_banking._http.HttpClient.get`` + ``json.loads`` of the body:
  the transport ``T24Client`` uses since it stopped using aiohttp;
- ``aiohttp``: ``aiohttp.ClientSession.get`` + ``json.loads``, with the same headers, a pooled
  connector and a pre-encoded URL (aiohttp at its leanest: the baseline it replaced);
- ``t24client``: ``T24Client.get_customer`` as the pipeline calls it (transport, breaker, retries'
  fast path, wire parsing, one log line and metrics per attempt).

``time.process_time()`` around each rep gives this process's CPU per GET (the simulator's is not
counted). Each variant checks its answers (status 200, the customer asked for). Prints per variant
the reps and the median µs per GET and the ratio httpclient/aiohttp (median of per-rep ratios),
and appends one JSON line to --out. aiohttp comes with the ``bench`` extra only (the service no
longer depends on it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import aiohttp
import uvloop
from procs import Child, free_port, wait_port

from regstream import logs
from regstream.core_banking import T24Client, T24ClientConfig
from regstream.core_banking._http import HttpClient

HEADERS = {"Accept": "application/json", "companyId": "GB0010001"}


def _customer(i: int) -> str:
    return f"7{i % 1_000_000_000:09d}"


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


async def _main(args: argparse.Namespace, base: str) -> dict[str, object]:
    prefix = "/api/v1.0.0"
    ours = HttpClient(base, headers=HEADERS, max_connections=args.concurrency)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=args.concurrency),
        headers=HEADERS,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    t24 = T24Client(T24ClientConfig(base_url=base + prefix, max_connections=args.concurrency))

    def check(status: int, body: bytes, i: int) -> None:
        if status != 200 or json.loads(body)["body"]["customerId"] != _customer(i):
            raise SystemExit(f"unexpected answer {status} for {_customer(i)}")

    async def httpclient(i: int) -> None:
        answer = await ours.get(
            f"{prefix}/party/customers/{_customer(i)}", {"X-Correlation-ID": os.urandom(16).hex()}
        )
        check(answer.status_code, answer.content, i)

    async def aiohttp_get(i: int) -> None:
        url = aiohttp.client.URL(f"{base}{prefix}/party/customers/{_customer(i)}", encoded=True)
        async with session.get(url, headers={"X-Correlation-ID": os.urandom(16).hex()}) as r:
            check(r.status, await r.read(), i)

    async def t24client(i: int) -> None:
        customer = await t24.get_customer(_customer(i))
        if customer.customer_id != _customer(i):
            raise SystemExit("wrong customer")

    variants: dict[str, Callable[[int], Awaitable[None]]] = {
        "httpclient": httpclient, "aiohttp": aiohttp_get, "t24client": t24client,
    }  # fmt: skip
    for get in variants.values():  # warm-up: connections, caches
        await _rep(get, min(500, args.n), args.concurrency)
    results: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            results[name].append(await _rep(variants[name], args.n, args.concurrency))
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()))
    await ours.aclose()
    await session.close()
    await t24.aclose()
    ratios = [a / b for a, b in zip(results["httpclient"], results["aiohttp"], strict=True)]
    return {
        "bench": "t24_http",
        "n": args.n,
        "concurrency": args.concurrency,
        "reps": args.reps,
        "us_per_get": {k: [round(x, 1) for x in v] for k, v in results.items()},
        "median_us_per_get": {k: round(statistics.median(v), 1) for k, v in results.items()},
        "httpclient_over_aiohttp": round(statistics.median(ratios), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=2000, help="GETs per variant per rep")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=32, help="GETs in flight")
    ap.add_argument("--out", default="bench/results/t24_http.jsonl")
    args = ap.parse_args()
    # The service's logging (redaction filter, text format), written to /dev/null: the T24
    # client's log line per attempt is part of what t24client measures.
    logs.configure("INFO")
    logging.getLogger().handlers[0].setStream(open(os.devnull, "w"))  # noqa: SIM115
    os.sched_setaffinity(0, {0})
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "regstream")
    with tempfile.TemporaryDirectory() as logdir:
        sim = Child(
            "t24-sim", [exe, "t24-sim", "--port", str(port), "--latency-ms", "0"], {1}, logdir
        )
        try:
            wait_port(port, sim, 30)
            result = uvloop.run(_main(args, f"http://127.0.0.1:{port}"))
        finally:
            sim.stop()
    print(json.dumps(result, indent=1))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
