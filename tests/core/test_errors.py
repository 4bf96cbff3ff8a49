"""The error hierarchy is web-free: the model, engine and registry load without FastAPI or Starlette."""
import subprocess
import sys


def test_engine_and_registry_do_not_import_the_web_layer():
    code = ("import sys, app.core.errors, app.model, app.engine.engine, app.registry.registry, app.trainer.train, "
            "app.batch.service; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette') "
            "or m.startswith('app.api')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
