"""Held-out loss curves: the 'flat' rule of docs/results_analysis.md, and the curve read from shipped files."""
import json

import pytest
from conftest import REPO

from app.trainer.__main__ import main
from app.trainer.figures import flatness


def test_flatness_measures_the_last_fifth_of_the_steps():
    assert flatness([(0, 1.0), (80, 0.5), (100, 0.499)]) == pytest.approx(
        {"from_step": 80, "to_step": 100, "from": 0.5, "to": 0.499, "change_pct": -0.2, "flat": True})
    slow = flatness([(0, 1.0), (70, 0.6), (90, 0.55), (100, 0.5)])  # no eval at 80: the last one before it
    assert slow["from_step"] == 70 and slow["change_pct"] == pytest.approx(-100 / 6) and not slow["flat"]
    assert flatness([(10, 1.0)])["change_pct"] == 0.0  # one eval: compared with itself


def test_curve_command_reads_a_shipped_base_and_continues_its_steps(capsys, tmp_path):
    mnist = REPO / "models" / "mnist.safetensors"
    assert main(["curve", str(mnist), "--png", str(tmp_path / "c.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["last_20pct"]["to_step"] == 10012 and out["last_20pct"]["change_pct"] == pytest.approx(-7.54, abs=0.01)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["curve", str(mnist), str(mnist)]) == 0  # a continuation's steps start where the previous file ended
    assert json.loads(capsys.readouterr().out)["curve"][-1][0] == 2 * 10012
    patch = REPO / "patches" / "mnist-dmp.safetensors"  # a patch's metrics hold its own curve: fine
    assert main(["curve", str(patch)]) == 0
    capsys.readouterr()
    (tmp_path / "bare.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    assert main(["curve", str(tmp_path / "bare.safetensors")]) == 2  # clear error, no traceback
    assert "no held-out loss curve" in capsys.readouterr().err
    assert main(["curve", str(tmp_path)]) == 2
