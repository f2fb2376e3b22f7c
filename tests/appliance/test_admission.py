"""The one admission queue and Retry-After rule every engine uses: an injected clock, no
sockets, no sleeps."""

from __future__ import annotations

import asyncio

import pytest

from appliance._private.engines.admission import AdmissionQueue
from appliance._private.engines.base import EngineLoad
from appliance._private.errors import QueueFullError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def queue(slots: int = 2, max_queue: int = 2, clock: Clock | None = None) -> AdmissionQueue:
    return AdmissionQueue("m", slots, max_queue, clock=clock or Clock())


def complete(admission: AdmissionQueue, clock: Clock, seconds: float) -> None:
    """One request admitted, run for `seconds` by the clock, completed."""
    admission.admit()
    started = admission.start()
    clock.now += seconds
    admission.finish(admission.clock() - started)


def refusal(admission: AdmissionQueue) -> QueueFullError:
    with pytest.raises(QueueFullError) as raised:
        admission.admit()
    return raised.value


def test_admits_slots_plus_queue_then_refuses_with_503_queue_full() -> None:
    admission = queue(slots=2, max_queue=1)
    for _ in range(3):
        admission.admit()
    error = refusal(admission)
    assert (error.status_code, error.code) == (503, "queue_full")
    assert error.retry_after == 2  # nothing completed yet: 1 s typical x 3 busy / 2 slots
    assert "The request queue for `m` is full (0 running, 3 waiting)" in error.message
    assert admission.load() == EngineLoad(running=0, waiting=3, slots=2)


def test_a_running_request_moves_from_waiting_to_running_and_frees_its_place() -> None:
    admission = queue(slots=1, max_queue=0)
    admission.admit()
    admission.start()
    assert admission.load() == EngineLoad(running=1, waiting=0, slots=1)
    refusal(admission)
    admission.finish()
    assert admission.load() == EngineLoad(running=0, waiting=0, slots=1)
    admission.admit()  # the place is free again


def test_withdrawn_requests_free_their_waiting_place() -> None:
    admission = queue(slots=1, max_queue=1)
    admission.admit()
    admission.admit()
    refusal(admission)
    admission.withdraw()
    admission.admit()
    assert admission.load().waiting == 2


def test_retry_after_is_typical_duration_times_busy_over_slots() -> None:
    clock = Clock()
    admission = queue(slots=2, max_queue=2, clock=clock)
    for seconds in (9.0, 10.0, 30.0):  # median 10
        complete(admission, clock, seconds)
    for _ in range(4):
        admission.admit()
    assert refusal(admission).retry_after == 20  # 10 s x 4 busy / 2 slots
    admission.start()
    admission.start()
    assert admission.retry_after() == 20  # running requests are busy too


def test_retry_after_is_clamped_to_1_and_60_seconds() -> None:
    clock = Clock()
    quick = queue(slots=4, max_queue=0, clock=clock)
    complete(quick, clock, 0.01)
    for _ in range(4):
        quick.admit()
    assert refusal(quick).retry_after == 1
    slow = queue(slots=1, max_queue=3, clock=clock)
    complete(slow, clock, 100.0)
    for _ in range(4):
        slow.admit()
    assert refusal(slow).retry_after == 60


def test_only_completed_requests_of_the_last_64_set_the_typical_duration() -> None:
    clock = Clock()
    admission = queue(slots=1, max_queue=0, clock=clock)
    complete(admission, clock, 50.0)
    assert admission.typical_duration() == 50.0
    admission.admit()
    admission.start()
    clock.now += 500.0
    admission.finish(None)  # failed or cancelled: not a typical duration
    assert admission.typical_duration() == 50.0
    for _ in range(64):
        complete(admission, clock, 2.0)
    assert admission.typical_duration() == 2.0  # the 50 s one has left the window


def test_refusal_names_what_running_means_for_the_engine() -> None:
    admission = AdmissionQueue("up", 1, 1, activity="in flight to the upstream")
    admission.admit()
    admission.start()
    admission.admit()
    assert "(1 in flight to the upstream, 1 waiting)" in refusal(admission).message


def test_a_queue_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="slots >= 1"):
        AdmissionQueue("m", 0, 1)


def test_async_slots_run_at_most_slots_at_once_and_time_completed_bodies() -> None:
    clock = Clock()
    admission = queue(slots=1, max_queue=2, clock=clock)
    order: list[str] = []

    async def scenario() -> None:
        release = asyncio.Event()

        async def first() -> None:
            async with admission.slot():
                order.append("first runs")
                await release.wait()
                clock.now += 8.0

        async def second() -> None:
            async with admission.slot():
                order.append("second runs")

        admission.admit()
        one = asyncio.create_task(first())
        admission.admit()
        two = asyncio.create_task(second())
        await asyncio.sleep(0)  # both tasks take their first step
        assert order == ["first runs"]
        assert admission.load() == EngineLoad(running=1, waiting=1, slots=1)
        release.set()
        await asyncio.gather(one, two)

    asyncio.run(scenario())
    assert order == ["first runs", "second runs"]
    assert admission.load() == EngineLoad(running=0, waiting=0, slots=1)
    assert admission.typical_duration() == 4.0  # median of 8 s and 0 s


def test_async_slot_withdraws_when_cancelled_waiting_and_skips_failed_bodies() -> None:
    clock = Clock()
    admission = queue(slots=1, max_queue=1, clock=clock)

    async def scenario() -> None:
        hold = asyncio.Event()

        async def holder() -> None:
            async with admission.slot():
                await hold.wait()
                clock.now += 30.0
                raise RuntimeError("the body failed")

        async def waiter() -> None:
            async with admission.slot():
                pytest.fail("a cancelled waiter never runs")

        admission.admit()
        running = asyncio.create_task(holder())
        admission.admit()
        waiting = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert admission.load() == EngineLoad(running=1, waiting=0, slots=1)
        hold.set()
        with pytest.raises(RuntimeError):
            await running

    asyncio.run(scenario())
    assert admission.load() == EngineLoad(running=0, waiting=0, slots=1)
    assert admission.typical_duration() == 1.0  # the failed body taught nothing
