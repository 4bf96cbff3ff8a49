"""The scheduling rule (`share`), the admission replay (`finish_times`) and its bound (`latest_finish`) as pure
functions."""
from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine.eta import MAX_ROUNDS, MIN_STRETCH, Planned, StepCosts, finish_times, latest_finish
from app.engine.share import share


@dataclass(eq=False)
class W:
    images: int
    steps_done: int = 0
    admitted_at: float = 0.0
    deadline: float = 100.0
    steps: int = 10
    background: bool = False


def run(works: list[W], max_batch: int, policy: str = "deadline") -> list[W]:
    """Step `share` until every work is done; the works in the order they finished."""
    finished: list[W] = []
    while len(finished) < len(works):
        for w in share([w for w in works if w not in finished], max_batch, policy):  # type: ignore[arg-type]
            w.steps_done += 1
            if w.steps_done == w.steps:
                finished.append(w)
    return finished


def test_small_requests_run_fewest_steps_left_first_and_none_overtakes_one_that_does_not_fit():
    works = [W(4, steps_done=9, admitted_at=1), W(8, admitted_at=2), W(4, admitted_at=3), W(16, admitted_at=0)]
    assert share(works, 16) == [works[0]]  # one step left goes first; the oldest full batch waits and holds the rest
    assert share(works[:3], 16) == [works[0], works[1], works[2]]
    assert share(works[:3], 8) == [works[0]]  # the 8-image one does not fit: the 4-image one behind it waits too
    assert share(works, 16, "fair") == [works[3]]  # fair: the oldest of the least advanced fills the batch alone
    assert share(works[:3], 16, "fair") == [works[1], works[2], works[0]]
    assert [w.steps_done for w in works] == [9, 0, 0, 0]  # nothing changed


def closed_loop(policy: str, clients: int, max_batch: int, steps: int, round_trip: int, total: int) -> tuple:
    """Clients that each send a 1-image request `round_trip` steps after their last one finished, stepped by `share`:
    (mean images per step, each request's steps from sent to finished)."""
    sent = {c: W(1, steps=steps, admitted_at=c) for c in range(clients)}
    back: dict[int, int] = {}  # client -> step its next request arrives
    rows, latency, t = [], [], 0
    while len(latency) < total:
        t += 1
        for c in [c for c, at in back.items() if at <= t]:
            sent[c] = W(1, steps=steps, admitted_at=t + c / clients)
            del back[c]
        chosen = share(list(sent.values()), max_batch, policy)  # type: ignore[arg-type]
        rows.append(sum(w.images for w in chosen))
        for w in chosen:
            w.steps_done += 1
        for c, w in list(sent.items()):
            if w.steps_done == w.steps:
                latency.append(t - int(w.admitted_at) + 1)
                back[c] = t + 1 + round_trip
                del sent[c]
    return sum(rows[steps:]) / len(rows[steps:]), latency


def test_a_closed_loop_keeps_the_batch_full_under_the_deadline_policy():
    """24 clients, 16 rows, 20-step requests, a reply and the next request two steps apart (bench.service's
    compiled runs stepped 15.1-15.5 images, about what this gives least steps done first): fewest steps left first
    lets requests finish one or two at a time while eight wait, so every step is full; least steps done first
    (fair) advances all 24 together, they finish in a group and steps run part-filled while the group sends again."""
    full, latency = closed_loop("deadline", clients=24, max_batch=16, steps=20, round_trip=2, total=2000)
    lockstep, _ = closed_loop("fair", clients=24, max_batch=16, steps=20, round_trip=2, total=2000)
    assert full > 15.9, full
    assert lockstep < 15.5, lockstep
    assert max(latency[100:]) <= 3 * 20  # a request waits at most about two requests' steps for its rows


def test_a_wide_small_request_is_not_overtaken_for_good_by_a_stream_of_narrow_ones():
    """16 narrow requests keep arriving; a 16-image one that does not fit runs once those ahead of it end."""
    narrow = [W(1, steps=20, steps_done=i, admitted_at=i) for i in range(16)]
    wide = W(16, steps=20, admitted_at=16)
    works, t = [*narrow, wide], 0
    while wide.steps_done < wide.steps:
        t += 1
        for w in share(works, 16):  # type: ignore[arg-type]
            w.steps_done += 1
        works = [w for w in works if w.steps_done < w.steps]
        works += [W(1, steps=20, admitted_at=100 + t) for _ in range(16 - sum(w.images for w in works) + 16)]
        assert t < 60, "the wide request never got its rows"
    assert t <= 20 + 20  # its own steps after the oldest narrow one's last


def test_large_requests_finish_one_after_another_in_deadline_order():
    """Six large requests that each fill the batch: the fair order rotates them (all end together, ~6x their own
    time); earliest deadline first finishes the first after its own steps."""
    def six() -> list[W]:
        return [W(4, steps=100, admitted_at=i, deadline=50 - i) for i in range(6)]  # the last admitted is due first

    fair = six()
    ends = {}
    steps = 0
    while len(ends) < 6:
        steps += 1
        for w in share([w for w in fair if w not in ends], 4, "fair"):  # type: ignore[arg-type]
            w.steps_done += 1
            if w.steps_done == w.steps:
                ends[w] = steps
    assert min(ends.values()) > 500  # lockstep: the first ends after ~6 x 100 steps
    deadline = six()
    assert run(deadline, 4) == deadline[::-1]  # one after another, earliest deadline first


def test_a_small_request_overtakes_large_ones_under_both_policies():
    for policy in ("deadline", "fair"):
        large = [W(8, steps=1000, steps_done=400, admitted_at=0), W(8, steps=1000, steps_done=400, admitted_at=1)]
        small = W(1, steps=5, admitted_at=2)
        assert share([*large, small], 16, policy)[0] is small


def test_background_rows_take_only_what_interactive_rows_leave():
    def linear(rows: int) -> float:
        return 0.01 * rows  # a CPU: every row costs

    def flat(rows: int) -> float:
        return 0.01  # a GPU below its knee: spare rows are free

    background = [W(4, background=True, admitted_at=i) for i in range(4)]
    interactive = W(4, admitted_at=9)
    assert share(background, 8) == background[:2]  # alone they fill the batch
    assert share([*background, interactive], 8, step_seconds=linear, slowdown=0.1) == [interactive]
    assert share([*background, interactive], 8, step_seconds=flat, slowdown=0.1) == [interactive, background[0]]
    assert share([*background, interactive], 8) == [interactive]  # no measure: no sharing


def test_replay_refuses_what_lockstep_would_cut():
    costs = StepCosts()
    costs.observe_step("b", 1, 0.01)
    costs.observe_step("b", 2, 0.02)
    one = Planned("b", 1, steps=100, steps_done=0, admitted_at=0, deadline=1.5)
    two = Planned("b", 1, steps=100, steps_done=0, admitted_at=1, deadline=1.5)
    alone = finish_times([one], costs, 16, 0.1, now=0.0)
    assert math.isclose(alone[one], 1.0)
    both = finish_times([one, two], costs, 16, 0.1, now=0.0)  # one batch of 2 rows: 2 s each
    assert both[one] == both[two] == math.inf  # both cut at 1.5 s
    gpu = StepCosts()  # a device where the second row is nearly free
    gpu.observe_step("b", 1, 0.01)
    gpu.observe_step("b", 2, 0.011)
    both = finish_times([one, two], gpu, 16, 0.1, now=0.0)
    assert both[one] < 1.5 and both[two] < 1.5


def test_step_costs_interpolate_and_extrapolate():
    costs = StepCosts()
    assert costs.step("b", 4) == 0.0
    costs.observe_step("b", 2, 0.02)
    costs.observe_step("b", 8, 0.05)
    assert math.isclose(costs.step("b", 4), 0.03)
    assert math.isclose(costs.step("b", 1), 0.01) and math.isclose(costs.step("b", 16), 0.10)


def test_the_stretch_follows_how_much_longer_replayed_requests_took():
    costs = StepCosts()
    assert costs.stretch() == 1.0  # nothing finished yet: the replay as it is
    for _ in range(200):
        costs.observe_finish(predicted=1.0, actual=1.5)
    assert math.isclose(costs.stretch(), 1.5, rel_tol=1e-3)
    for _ in range(200):
        costs.observe_finish(predicted=2.0, actual=1.0)  # faster than replayed: admission may take more again
    assert math.isclose(costs.stretch(), 0.5, rel_tol=1e-3)
    for _ in range(200):
        costs.observe_finish(predicted=1.0, actual=0.01)
    floor = costs.stretch()
    assert math.isclose(floor, MIN_STRETCH, rel_tol=1e-6)  # each ratio is clamped before it is averaged
    costs.observe_finish(predicted=0.0, actual=1.0)  # nothing to compare with: ignored
    assert costs.stretch() == floor


def test_replay_agrees_with_stepping_share():
    """The replay's jumps (the same works until one finishes) land exactly where stepping `share` one step at a time
    does: fewest steps left first keeps the chosen works chosen until one of them ends."""
    import random

    rng = random.Random(0)
    costs = StepCosts()
    for n in range(1, 17):
        costs.observe_step("b", n, 0.01)  # every step costs the same: finish time = steps taken x 0.01
    plans = [Planned("b", rng.choice([1, 2, 4, 8]), steps=rng.choice([5, 20, 50, 300, 600]), steps_done=0,
                     admitted_at=i, deadline=1e9) for i in range(30)]
    works = {p: W(p.images, steps=p.steps, admitted_at=p.admitted_at, deadline=p.deadline) for p in plans}
    finished: dict[Planned, float] = {}
    taken = 0
    while len(finished) < len(works):
        taken += 1
        for w in share([w for p, w in works.items() if p not in finished], 16):  # type: ignore[arg-type]
            w.steps_done += 1
        for p, w in works.items():
            if w.steps_done == w.steps and p not in finished:
                finished[p] = taken * 0.01
    replay = finish_times(plans, costs, 16, 0.1, now=0.0)
    for p in plans:
        assert math.isclose(replay[p], finished[p], abs_tol=1e-9), (p, replay[p], finished[p])


def test_a_step_of_background_rows_alone_lasts_about_one_interactive_step():
    """An interactive request that arrives while background rows step alone waits for that step to end: on a CPU
    (every row costs) that step holds the rows of a 1-image step's time, not a full batch; below a GPU's knee (rows
    free) it is still a full batch; the first background work always runs, whatever its size."""
    def linear(rows: int) -> float:
        return 0.002 + 0.01 * rows  # a fixed cost per step, then every row costs

    def flat(rows: int) -> float:
        return 0.01

    ones = [W(1, background=True, admitted_at=i) for i in range(8)]
    assert share(ones, 8, step_seconds=linear, slowdown=0.1) == ones[:1]
    assert share(ones, 8, step_seconds=lambda rows: 0.02 + 0.001 * rows, slowdown=0.1) == ones[:3]
    assert share(ones, 8, step_seconds=flat, slowdown=0.1) == ones
    big = [W(4, background=True, admitted_at=0), W(1, background=True, admitted_at=1)]
    assert share(big, 8, step_seconds=linear, slowdown=0.1) == big[:1]


def test_the_background_step_budget_is_its_own_setting():
    """`alone` (DMP_BACKGROUND_STEP) sizes a step of background rows alone in 1-image steps, apart from how much
    background rows may slow an interactive step (`slowdown`): raising it buys batch throughput on an idle replica
    without letting batch rows into interactive steps."""
    def linear(rows: int) -> float:
        return 0.01 * rows

    ones = [W(1, background=True, admitted_at=i) for i in range(8)]
    assert share(ones, 8, step_seconds=linear, slowdown=0.1) == ones[:1]
    assert share(ones, 8, step_seconds=linear, slowdown=0.1, alone=4.0) == ones[:4]
    interactive = W(1, admitted_at=9)
    assert share([*ones, interactive], 8, step_seconds=linear, slowdown=0.1, alone=4.0) == [interactive]


plan = st.builds(lambda base, images, steps, done, background, deadline, admitted:
                 Planned(base, images, steps, min(done, steps - 1), admitted, deadline, background),
                 st.sampled_from("ab"), st.integers(1, 40), st.integers(1, 80), st.integers(0, 79), st.booleans(),
                 st.one_of(st.just(1e9), st.floats(0.01, 50)), st.floats(0, 10))


@settings(max_examples=400, deadline=None)
@given(plans=st.lists(plan, min_size=1, max_size=12), max_batch=st.integers(1, 16),
       slowdown=st.floats(0, 1),
       measured=st.dictionaries(st.tuples(st.sampled_from("ab"), st.integers(1, 40)), st.floats(0.001, 1.0),
                                max_size=10),
       decode=st.floats(0, 0.5))
def test_latest_finish_bounds_the_replay(plans, max_batch, slowdown, measured, decode):
    """Admission skips the replay when this bound is inside every deadline: it must never come before a finish the
    replay computes, whatever the bases, sizes, progress and (not necessarily monotone) measured costs."""
    costs = StepCosts()
    for (base, rows), seconds in measured.items():
        costs.observe_step(base, rows, seconds)
    for base in "ab":
        costs.observe_decode(base, 1, decode)
    bound = latest_finish(plans, costs, max_batch, now=0.0)
    replayed = finish_times(plans, costs, max_batch, slowdown, now=0.0)
    for p, finish in replayed.items():
        if bound < min((q.deadline for q in plans if not q.background), default=math.inf):  # no interactive cut
            assert finish <= bound + 1e-9, (p, finish, bound)


def test_latest_finish_gives_up_where_the_replay_could_run_out_of_rounds():
    costs = StepCosts()
    costs.observe_step("b", 16, 0.01)
    huge = Planned("b", 16, steps=MAX_ROUNDS, steps_done=0, admitted_at=0, deadline=1e12)
    assert latest_finish([huge], costs, 16, now=0.0) == math.inf
    small = Planned("b", 1, steps=20, steps_done=0, admitted_at=0, deadline=1e12)
    assert latest_finish([small], costs, 16, now=5.0) == 5.0 + 20 * 0.01
