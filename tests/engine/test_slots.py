"""SlotTable: a pinned version keeps its slot after a swap until its last request releases it."""
from __future__ import annotations

import pytest

from app.engine.slots import SlotTable
from app.model.dmp import PatchError, PatchPool, new_patch_for
from conftest import tiny_base


@pytest.fixture
def table():
    base = tiny_base("class", seed=0)
    return SlotTable(PatchPool(32, 16, 2, slots=3)), new_patch_for(base)


def test_swap_frees_old_slot_only_after_release(table):
    slots, patch = table
    v1, _ = slots.install("p", "v1", patch)
    pin = slots.acquire("p")
    v2, replaced = slots.install("p", "v2", patch)
    assert replaced and v2.slot != v1.slot and slots.stats() == (2, 1)
    assert slots.acquire("p").version == "v2"  # later requests get the new version
    with pytest.raises(PatchError, match="no free patch slot"):
        slots.install("q", "x", patch)  # v1 is still pinned
    slots.release(pin)
    assert slots.stats() == (1, 0)
    assert slots.install("q", "x", patch)[0].slot == v1.slot


def test_same_version_is_a_no_op_and_remove_retires(table):
    slots, patch = table
    first, _ = slots.install("p", "v1", patch)
    again, replaced = slots.install("p", "v1", patch)
    assert again is first and not replaced and slots.stats() == (1, 0)
    assert slots.remove("p") and slots.acquire("p") is None and slots.stats() == (0, 0)
