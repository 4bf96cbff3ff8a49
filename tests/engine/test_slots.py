"""PatchSlots: pinned versions survive swaps, device slots are an LRU over running requests, host copies are bounded."""
from __future__ import annotations

import pytest
from conftest import tiny_base

from app.core.metrics import Metrics
from app.engine.slots import PatchSlots, Pins
from app.model.dmp import PatchPool, new_patch_for


class Store:
    """Stands in for the registry's fetch: counts read-backs."""

    def __init__(self, patch):
        self.patch, self.reads = patch, []

    def __call__(self, name, version):
        self.reads.append(name)
        return self.patch


@pytest.fixture
def setup():
    patch = new_patch_for(tiny_base("class", seed=0))
    metrics = Metrics()
    return PatchSlots("digits", PatchPool(32, 16, 2, slots=3), 10**9, metrics), patch, Store(patch), metrics


def sample(metrics, name, patch):
    return metrics.registry.get_sample_value(name, {"model": "digits", "patch": patch})


def test_a_pinned_version_keeps_its_slot_after_a_swap(setup):
    slots, patch, load, _ = setup
    slots.offer("p", "v1", patch, 100)
    pin = slots.acquire("p", load)
    first = slots.seat(pin)
    assert slots.offer("p", "v2", patch, 100)  # replaced
    newer = slots.acquire("p", load)
    assert newer.version == "v2" and slots.held_versions("p") == ["v1"]
    assert slots.seat(newer) != first and slots.stats()["slots"] == 2
    assert slots.acquire("q", load) is None  # unknown name
    slots.release(pin, seated=True)
    assert slots.held_versions("p") == [] and slots.stats()["slots"] == 1  # v1's slot freed with its last request


def test_device_slots_are_an_lru_over_running_requests(setup):
    slots, patch, load, metrics = setup  # 2 usable slots
    for name in "abc":
        slots.offer(name, "v", patch, 100)
    a, b, c = (slots.acquire(n, load) for n in "abc")
    sa, sb = slots.seat(a), slots.seat(b)
    assert slots.residency("a") == "device" and slots.residency("c") == "host"
    assert slots.seat(c) is None  # both slots are read by running requests: c waits
    assert slots.victim() is a  # equal load: the least recently seated frees first
    slots.release(a, seated=True)
    assert slots.seat(c) == sa and slots.residency("a") == "host"  # a evicted, c swapped into its slot
    assert slots.seat(b, evict=False) == sb and slots.seat(b, evict=False, avoid=b) is None
    assert sample(metrics, "dmp_patch_swap_ins_total", "c") == 1
    assert sample(metrics, "dmp_patch_evictions_total", "a") == 1
    assert sample(metrics, "dmp_patch_resident", "a") is None and sample(metrics, "dmp_patch_resident", "c") == 1
    assert load.reads == []  # everything came from host memory


def test_host_copies_are_bounded_and_read_back_from_the_store(setup):
    _, patch, load, metrics = setup
    slots = PatchSlots("digits", PatchPool(32, 16, 2, slots=2), 250, metrics)  # two 100-byte copies fit
    for name in "abcd":
        slots.offer(name, "v", patch, 100)
    assert [slots.residency(n) for n in "abcd"] == ["stored", "stored", "host", "host"]
    pin = slots.acquire("a", load)  # read back, pinned: stays over budget until released
    assert load.reads == ["a"] and slots.residency("a") == "host"
    assert slots.seat(pin) == 1 and slots.residency("a") == "device"
    slots.release(pin, seated=True)
    assert slots.stats()["host_bytes"] <= 250
    assert slots.withdraw("a") and slots.residency("a") == "stored" and slots.stats()["slots"] == 0
    assert sample(metrics, "dmp_patch_swap_ins_total", "a") is None  # a deleted patch leaves no series


def test_seat_waiting_blocks_behind_the_first_that_cannot_seat(setup):
    """Oldest first; once one waits for a slot, younger ones may join resident versions except the victim's."""
    slots, patch, load, _ = setup  # 2 usable slots
    for name in "abc":
        slots.offer(name, "v", patch, 100)
    a, b, c = (slots.acquire(n, load) for n in "abc")
    sa, sb = slots.seat(a), slots.seat(b)  # both slots read by running requests
    a2, b2 = slots.acquire("a", load), slots.acquire("b", load)
    c, a2, b2 = (Pins([v], [1.0]) for v in (c, a2, b2))
    assert slots.seat_waiting([None, c, a2, b2]) == [(), None, None, ((sb, 1.0),)]  # a is the victim: a2 waits
    slots.release(a, seated=True)
    assert slots.seat_waiting([c, a2]) == [((sa, 1.0),), None]  # c took a's slot; a2 now waits for one


def test_a_composition_seats_all_its_versions_or_none(setup):
    """Two patches of one request need two slots at once; with one free, neither stays seated, and both seat once
    a slot frees."""
    slots, patch, load, _ = setup  # 2 usable slots
    for name in "abc":
        slots.offer(name, "v", patch, 100)
    a = slots.acquire("a", load)
    slots.seat(a)  # a running request holds one slot
    mix = Pins([slots.acquire("b", load), slots.acquire("c", load)], [0.5, -1.0])
    assert slots.seat_waiting([mix]) == [None]
    assert all(v.seated == 0 for v in mix.versions)  # nothing left half-seated
    slots.release(a, seated=True)
    (pairs,) = slots.seat_waiting([mix])
    assert pairs is not None and [s for _, s in pairs] == [0.5, -1.0] and len({p for p, _ in pairs}) == 2
    slots.release(mix, seated=True)
    assert all(v.refs == 0 and v.seated == 0 for v in mix.versions)

