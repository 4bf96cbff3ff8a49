"""The Engine's start and stop as the process sees them."""
from __future__ import annotations

import gc

from app.core.config import Settings
from app.engine.engine import Engine


def test_a_ready_engine_has_frozen_its_startup_heap_and_a_stopped_one_thaws_it(class_only_dirs):
    engine = Engine(Settings(model_dir=class_only_dirs["models"], patch_dir=class_only_dirs["patches"],
                             torch_threads=1))
    try:
        engine.start()
        assert engine.state == "ready", engine.error
        # what loading left is out of the collector's walk: a full collection no longer stalls the runner on it
        assert gc.get_freeze_count() > 0
    finally:
        engine.stop()
    assert gc.get_freeze_count() == 0
