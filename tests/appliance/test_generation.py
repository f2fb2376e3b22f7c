"""Generation hand-off between an engine thread and the event loop: batched wake-ups."""

from __future__ import annotations

import asyncio
import threading

from appliance._private.engines.base import Finish, Generation, Prompt, SamplingParams, WakeBatch


def _generation(loop: asyncio.AbstractEventLoop) -> Generation:
    return Generation(Prompt(size=1, tokens=[1]), SamplingParams(max_tokens=8), loop)


def test_a_deferred_wake_reaches_the_reader_only_when_the_batch_is_flushed() -> None:
    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        generations = [_generation(loop) for _ in range(3)]
        readers = [asyncio.ensure_future(g.text()) for g in generations]
        await asyncio.sleep(0)  # every reader is now waiting for its first text
        wakes = WakeBatch()
        flushed = threading.Event()

        def engine() -> None:
            for index, generation in enumerate(generations):
                generation.emit(f"text {index}", wakes)
            flushed.wait(5)  # the test checks nothing was woken before the flush
            wakes.flush()
            for generation in generations:
                generation.close(Finish("stop", 1, 1))

        worker = threading.Thread(target=engine)
        worker.start()
        done, _ = await asyncio.wait(readers, timeout=0.2)
        assert not done  # texts are queued, but no reader was woken
        flushed.set()
        texts = await asyncio.wait_for(asyncio.gather(*readers), timeout=5)
        worker.join(5)
        return texts

    assert asyncio.run(scenario()) == ["text 0", "text 1", "text 2"]


def test_flushing_into_a_closed_loop_cancels_the_generations() -> None:
    loop = asyncio.new_event_loop()
    generation = _generation(loop)

    async def wait_for_text() -> None:
        await generation.wait_started()

    reader = loop.create_task(wait_for_text())
    loop.run_until_complete(asyncio.sleep(0))  # the reader now waits
    loop.close()  # the server went away with its reader still waiting
    wakes = WakeBatch()
    generation.emit("late", wakes)
    wakes.flush()
    assert generation.cancelled
    assert not reader.done()
