"""The stream start-up gate (api/admission.py): bounded, first come first served, deferrals."""

from __future__ import annotations

import asyncio

import pytest

from regstream.api.admission import StartGate


async def _hold(gate: StartGate, name: str, order: list[str], release: asyncio.Event) -> bool:
    async with gate.admit() as admitted:
        if admitted:
            order.append(name)
            await release.wait()
        return admitted


async def test_at_most_concurrency_run_and_waiters_go_in_arrival_order() -> None:
    gate = StartGate(concurrency=2, queue_max=10, max_wait=5)
    order: list[str] = []
    releases = [asyncio.Event() for _ in range(6)]
    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(_hold(gate, f"s{i}", order, releases[i])))
        await asyncio.sleep(0)  # arrive one after the other
    await asyncio.sleep(0.01)
    assert (order, gate.running, gate.waiting) == (["s0", "s1"], 2, 4)
    for i in (1, 0, 2, 3):  # finishing out of order frees slots for the queue's head
        releases[i].set()
        await asyncio.sleep(0.01)
    assert order == ["s0", "s1", "s2", "s3", "s4", "s5"]
    assert gate.running == 2
    releases[4].set()
    releases[5].set()
    assert await asyncio.gather(*tasks) == [True] * 6
    assert (gate.running, gate.waiting) == (0, 0)


@pytest.mark.parametrize(
    ("queue_max", "max_wait"),
    [pytest.param(1, 5.0, id="queue-full"), pytest.param(10, 0.05, id="waited-too-long")],
)
async def test_the_excess_is_deferred(queue_max: int, max_wait: float) -> None:
    gate = StartGate(concurrency=1, queue_max=queue_max, max_wait=max_wait)
    order: list[str] = []
    release = asyncio.Event()
    first = asyncio.create_task(_hold(gate, "first", order, release))
    second = asyncio.create_task(_hold(gate, "second", order, release))
    await asyncio.sleep(0.01)
    async with gate.admit() as admitted:
        assert admitted is False  # full queue at once, or after max_wait
    release.set()
    # the waiter before us: admitted when the first ends, or deferred as well after max_wait
    assert list(await asyncio.gather(first, second)) == [True, queue_max == 1]
    assert (gate.running, gate.waiting) == (0, 0)


async def test_a_waiter_that_goes_away_leaves_no_trace() -> None:
    gate = StartGate(concurrency=1, queue_max=10, max_wait=5)
    order: list[str] = []
    release = asyncio.Event()
    first = asyncio.create_task(_hold(gate, "first", order, release))
    gone = asyncio.create_task(_hold(gate, "gone", order, release))
    third = asyncio.create_task(_hold(gate, "third", order, release))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.sleep(0.01)
    assert gate.waiting == 1
    release.set()
    assert list(await asyncio.gather(first, third)) == [True, True]
    assert order == ["first", "third"]
    assert (gate.running, gate.waiting) == (0, 0)
