"""Overload and background work through the real Engine on a tiny base: what is admitted finishes, what cannot
finish is refused at once (429 deadline_unreachable), and background work yields to interactive requests."""
from __future__ import annotations

import asyncio
import time

import pytest

from app.core.config import Settings
from app.core.errors import DeadlineExceeded, Overloaded
from app.engine.engine import QUIET_WAIT, Engine
from app.engine.work import Step


@pytest.fixture
def engine_on(class_only_dirs):
    """Factory: a started Engine on the tiny class base with these settings; all are stopped at the end."""
    engines = []

    def make(**settings) -> Engine:
        engine = Engine(Settings(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"],
                                 torch_threads=1, max_steps=5000, max_cost=100_000, **settings))
        engines.append(engine)
        engine.start()
        assert engine.state == "ready", engine.error
        return engine

    yield make
    for engine in engines:
        engine.stop()


async def timed(engine: Engine, steps: int, images: int, seed: int, background: bool = False):
    """(outcome or the error raised, seconds it took)."""
    spec = engine.resolve(model="digits", class_label=seed % 10, steps=steps, num_images=images, seed=seed)
    started = time.perf_counter()
    try:
        result: object = await (await engine.open(spec, background=background)).outcome()
    except (Overloaded, DeadlineExceeded) as e:
        result = e
    return result, time.perf_counter() - started


def steps_for(engine: Engine, seconds: float, images: int) -> int:
    """Steps of `images` rows that take about `seconds` alone, from a measured run."""
    _, took = asyncio.run(timed(engine, 100, images, seed=99))
    return max(30, round(100 * seconds / took))


def estimate(engine: Engine, steps: int, images: int) -> float:
    """Seconds one request of `steps` x `images` rows takes alone by the engine's own step and decode times: what
    its admission replays, so deadlines set from it make admission independent of how the machine ran meanwhile."""
    assert engine.batcher is not None
    costs = engine.batcher.costs
    return steps * costs.step("digits", images) + costs.decode("digits", images)


@pytest.mark.parametrize("policy", ["deadline", "fair"])
def test_six_large_requests_admitted_together(engine_on, policy):
    """Issue 25 item 8, scaled down: six requests that each fill the batch and take half the deadline alone,
    sent together. The fair policy (main's only one) moves them in lockstep and none completes; the deadline
    policy admits what can finish, finishes it, and refuses the rest at once with Retry-After."""
    engine = engine_on(max_batch=4, scheduler=policy)
    steps = steps_for(engine, 1.0, images=4)  # ~1 s runs: a CI hiccup of ~0.1 s is small beside them
    # One request alone takes half the deadline by the engine's own estimate: 2x slack for a slow run on a shared CI
    # machine (with 0.65, a Zen 3 VM's run beside another test worker once took 1.5x its estimate and was cut); two
    # take 1.0x, past the admission headroom (0.9).
    timeout = estimate(engine, steps, 4) / 0.5
    engine.settings.request_timeout = timeout

    async def six():
        return await asyncio.gather(*(timed(engine, steps, 4, seed=i) for i in range(6)))

    results = asyncio.run(six())
    done = [took for r, took in results if not isinstance(r, Exception)]
    refused = [(r, took) for r, took in results if isinstance(r, Overloaded)]
    cut = [r for r, _ in results if isinstance(r, DeadlineExceeded)]
    if policy == "fair":
        assert not done and len(cut) == 6, results
        return
    assert done and not cut, results  # everything admitted finished
    assert len(done) + len(refused) == 6
    for error, took in refused:
        assert error.error_type == "deadline_unreachable" and took < 0.2 * timeout, (error, took)
        assert int(error.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("stretch", [1.0, 3.0])
def test_admission_stretches_the_replay_by_how_late_admitted_requests_finished(engine_on, stretch):
    """Two requests sent together, each 0.2 of the deadline by the engine's own step times: both admitted while
    finished requests took as long as their replays said; once they took three times as long (0.6 and 1.2 of the
    deadline), the second is refused."""
    engine = engine_on(max_batch=4)
    steps = steps_for(engine, 1.0, images=4)  # also this engine's own step times
    engine.settings.request_timeout = estimate(engine, steps, 4) / 0.2  # not a wall clock: CI stop 48's flake
    assert engine.batcher is not None
    for _ in range(200):
        engine.batcher.costs.observe_finish(predicted=1.0, actual=stretch)
    engine.refresh_gauges()  # what a scrape reads
    assert abs(engine.metrics.admission_stretch._value.get() - stretch) < 1e-3

    async def two():
        return await asyncio.gather(*(timed(engine, steps, 4, seed=i) for i in range(2)))

    results = [r for r, _ in asyncio.run(two())]
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert not any(isinstance(r, DeadlineExceeded) for r in results), results
    if stretch == 1.0:
        assert not refused, results
    else:
        assert len(refused) == 1 and refused[0].error_type == "deadline_unreachable", results


def test_interactive_request_under_full_background_load(engine_on):
    """Eight background requests that each fill the batch; an interactive one sent while they run takes about
    its time alone (it joins at the next step boundary, the background rows pause), the background work all
    completes, and it does not count against DMP_MAX_QUEUE (1 here) but against DMP_MAX_BACKGROUND."""
    engine = engine_on(max_batch=4, max_queue=1, max_background=8, request_timeout=60)
    steps = steps_for(engine, 0.5, images=4)
    alone = min(asyncio.run(timed(engine, steps, 4, seed=1))[1] for _ in range(2))

    async def scenario():
        background = [asyncio.create_task(timed(engine, 2 * steps, 4, seed=10 + i, background=True))
                      for i in range(8)]
        give_up = time.monotonic() + 60  # fail with what the background requests returned, never hang
        while engine.batcher is not None and not engine.batcher.running["digits"]:
            ended = [t.result() for t in background if t.done()]
            assert len(ended) < len(background) and time.monotonic() < give_up, ended
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # background rows fill every step now
        extra, _ = await timed(engine, 10, 1, seed=30, background=True)
        interactive, took = await timed(engine, steps, 4, seed=1)
        busy = len(engine.batcher.running["digits"]) if engine.batcher else 0
        return extra, interactive, took, busy, await asyncio.gather(*background)

    extra, interactive, took, busy, background = asyncio.run(scenario())
    step = engine.batcher.costs.step("digits", 4) if engine.batcher else 0.0
    print(f"interactive {steps} steps x 4 images: alone {alone:.3f} s, under background load {took:.3f} s "
          f"(one step {1000 * step:.1f} ms)")
    assert isinstance(extra, Overloaded) and extra.error_type == "background_full", extra
    assert not isinstance(interactive, Exception), interactive
    assert busy >= 6, "the background work was still there when the interactive request finished"
    assert took < 1.5 * alone + 0.25, (took, alone)  # generous for the shared CPU; sharing rows would be ~5x
    assert all(not isinstance(r, Exception) for r, _ in background), background


def test_a_background_decode_waits_while_interactive_work_runs(engine_on):
    """A background request that finishes while an interactive one is running (its rows joined the interactive
    steps: DMP_BACKGROUND_SLOWDOWN high) is decoded only after the interactive one is done, so a slow decode (a
    latent base's VAE; 0.4 s here) does not delay the interactive request; the background request still completes."""
    engine = engine_on(max_batch=4, background_slowdown=100.0)
    base = engine.bases["digits"]
    identity = base.vae.decode

    def slow_decode(latents):
        time.sleep(0.4)
        return identity(latents)

    base.vae.decode = slow_decode
    steps = steps_for(engine, 0.4, images=1)  # (this run decodes once, slowly: part of nothing measured)
    alone = min(asyncio.run(timed(engine, steps, 1, seed=1))[1] for _ in range(2))

    async def scenario():
        # ~50 ms of steps alone: a poll every ms sees it running even on a busy machine (3 steps were missed once, and
        # the poll then waited forever); beside the interactive steps it still ends long before them
        background = asyncio.create_task(timed(engine, max(3, steps // 8), 1, seed=10, background=True))
        while engine.batcher is not None and not engine.batcher.running["digits"]:
            assert not background.done(), "the background request ended before it was seen running"
            await asyncio.sleep(0.001)
        interactive = await timed(engine, steps, 1, seed=1)
        ended = time.perf_counter()
        return interactive, ended, await background, time.perf_counter()

    (interactive, took), ended, (result, _), background_ended = asyncio.run(scenario())
    print(f"interactive {steps} steps: alone {alone:.3f} s (its own 0.4 s decode included), beside a finishing "
          f"background request {took:.3f} s")
    assert not isinstance(interactive, Exception) and not isinstance(result, Exception), (interactive, result)
    assert took < alone + 0.25, (took, alone)  # with the background decode in between: about alone + 0.4 s
    assert background_ended > ended


@pytest.mark.parametrize("grace", [0.0, 0.6])
def test_background_steps_wait_the_grace_after_an_interactive_answer(engine_on, grace):
    """DMP_BACKGROUND_GRACE: after an interactive request is answered, a running background request takes no step
    for that long (the response goes out, the client's next request comes in, without a batch step between);
    then it goes on. Without a grace it steps again at once."""
    engine = engine_on(max_batch=4, background_grace=grace)
    assert engine.batcher is not None

    def background_steps() -> int:
        return sum(w.steps_done for w in engine.batcher.running["digits"] if w.background)

    async def scenario():
        background = asyncio.create_task(timed(engine, 1000, 1, seed=10, background=True))
        while background_steps() < 5:
            assert not background.done(), background.result()
            await asyncio.sleep(0.005)
        interactive, _ = await timed(engine, 5, 1, seed=1)
        answered = background_steps()
        await asyncio.sleep(0.4)
        within = background_steps()
        await asyncio.sleep(0.6)
        after = background_steps()
        background.cancel()
        return interactive, answered, within, after

    interactive, answered, within, after = asyncio.run(scenario())
    print(f"grace {grace}: background steps at the answer {answered}, 0.4 s later {within}, 1.0 s later {after}")
    assert not isinstance(interactive, Exception), interactive
    if grace:
        assert within == answered < after, (answered, within, after)
    else:
        assert within > answered, (answered, within)


def test_background_python_waits_for_interactive_requests_to_end(engine_on):
    """Engine.interactive_quiet (what a batch line awaits before its PNGs, answer file and next line): it returns
    when the interactive request in flight ends, and after QUIET_WAIT at most while one is still running."""
    engine = engine_on(max_batch=4)
    short = steps_for(engine, 0.3 * QUIET_WAIT, images=1)
    leg = min(1000, steps_for(engine, 0.5 * QUIET_WAIT, images=1))

    async def one(steps: int, seed: int, halfway: asyncio.Event) -> None:
        work = await engine.open(engine.resolve(model="digits", class_label=seed % 10, steps=steps, seed=seed),
                                 follow=True)
        async for event in work.events():
            if isinstance(event, Step) and event.step >= steps // 2:
                halfway.set()

    async def interactive_load(steps: int, seconds: float) -> float:
        """Requests in relay, each opened when the one before is halfway, until `seconds` passed: never a moment
        without one in flight, however fast this machine's steps are (one request is capped at 1000 steps)."""
        started, legs = time.perf_counter(), []
        while not legs or time.perf_counter() - started < seconds:
            halfway = asyncio.Event()
            legs.append(asyncio.create_task(one(steps, len(legs), halfway)))
            await halfway.wait()
        await asyncio.gather(*legs)
        return time.perf_counter() - started

    async def quiet_beside(steps: int, seconds: float) -> tuple[float, float]:
        interactive = asyncio.create_task(interactive_load(steps, seconds))
        while not engine.inflight:
            await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        await engine.interactive_quiet()
        quiet = time.perf_counter() - t0
        return quiet, await interactive

    quiet, took = asyncio.run(quiet_beside(short, 0))
    print(f"beside a {took:.3f} s request: quiet after {quiet:.3f} s")
    assert 0.8 * took <= quiet < QUIET_WAIT, (quiet, took)
    quiet, took = asyncio.run(quiet_beside(leg, 2 * QUIET_WAIT))
    print(f"beside {took:.3f} s of relayed requests: quiet after {quiet:.3f} s")
    assert took > QUIET_WAIT and QUIET_WAIT <= quiet < min(took, QUIET_WAIT + 0.3), (quiet, took)
