"""When the runner hands a finished request's answer to its reader: as the next forward starts (a compiled CPU
forward holds no GIL, so the HTTP work the answer wakes runs beside it), or at once when no forward follows."""
from __future__ import annotations

import asyncio

import pytest

from app.core.config import Settings
from app.engine.engine import Engine


@pytest.fixture
def engine(class_only_dirs):
    engine = Engine(Settings(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"],
                             torch_threads=1, max_batch=4))
    engine.start()
    assert engine.state == "ready", engine.error
    yield engine
    engine.stop()


def count_forwards(engine: Engine) -> list[int]:
    """Wrap the base's step: [forwards entered so far], updated as they start, counted from the steps planned
    before (the engine's warm-up)."""
    assert engine.batcher is not None
    entered, step = [planned_steps(engine)], engine.batcher.steps["digits"]

    def counted(batch):
        entered[0] += 1
        return step(batch)

    engine.batcher.steps["digits"] = counted
    return entered


def planned_steps(engine: Engine) -> int:
    """Batched steps the runner has planned (each observes dmp_batch_size before its forward)."""
    return next(int(s.value) for m in engine.metrics.batch_size.collect() for s in m.samples
                if s.name == "dmp_batch_size_count" and s.labels == {"model": "digits"})


async def answer_moment(engine: Engine, entered: list[int], steps: int, seed: int) -> tuple[int, int]:
    """(steps planned, forwards entered) when the request's answer was handed over, on the runner thread."""
    work = await engine.open(engine.resolve(model="digits", class_label=3, steps=steps, seed=seed))
    seen: list[tuple[int, int]] = []
    work.future.add_done_callback(lambda _: seen.append((planned_steps(engine), entered[0])))
    await work.outcome()
    # the runner thread calls the future's callbacks in order: the engine's (which wakes this reader) before this
    # one, so on a busy machine the reader can get here first
    for _ in range(5000):
        if seen:
            break
        await asyncio.sleep(0.001)
    return seen[0]


def test_an_answer_waits_for_the_next_forward_to_start(engine):
    """A short request finishing beside a long one is answered after the next step is planned, before its
    forward is entered: what the runner does in Python between forwards does not compete with the reply."""
    entered = count_forwards(engine)

    async def scenario():
        long = asyncio.create_task(engine.open(engine.resolve(model="digits", class_label=1, steps=400, seed=1)))
        running = await long
        while engine.batcher is not None and not engine.batcher.running["digits"]:
            await asyncio.sleep(0.001)
        moment = await answer_moment(engine, entered, steps=5, seed=2)
        running.cancel()
        return moment

    planned, forwards = asyncio.run(scenario())
    assert planned == forwards + 1, (planned, forwards)


def test_an_answer_with_no_forward_after_it_goes_at_once(engine):
    """Alone, the request's answer is handed over after its last forward, without waiting for another."""
    entered = count_forwards(engine)
    planned, forwards = asyncio.run(answer_moment(engine, entered, steps=5, seed=3))
    assert planned == forwards, (planned, forwards)
