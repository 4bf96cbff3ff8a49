"""The FastAPI app factory: routes, error mapping, middleware, static UI, and the engine's lifespan."""
from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from app.api import batches, files, gates, generate, health, metrics, models, patches, v1
from app.api.errors import install_error_handlers
from app.api.keys import KeyGate
from app.api.middleware import ConsoleHeaders, Gatekeeper, RequestContext
from app.batch.service import BatchService
from app.core.config import Settings
from app.core.metrics import Metrics
from app.engine.engine import Engine
from app.engine.gatemaps import GateMaps

STATIC_DIR = Path(__file__).resolve().parents[1] / "web" / "static"


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Load and warm up in the background (so /health/live answers at once); stop the engine on the way out."""
    engine: Engine = app.state.engine
    engine.start_in_background()
    app.state.batches.start(engine, batches.line_answerer(engine, app.state.keys))
    yield
    await app.state.batches.stop()
    app.state.gate_maps.stop()
    await run_in_threadpool(engine.stop)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="DMP patch server", version="0.1.0", lifespan=lifespan,
                  description="Diffusion transformers served with hot-swappable DMP patches (docs/design.md §4).")
    app.state.settings = settings
    app.state.engine = Engine(settings, Metrics())
    app.state.gate_maps = GateMaps(app.state.engine)
    app.state.batches = BatchService(settings, app.state.engine.metrics)
    app.state.keys = KeyGate(settings, app.state.engine.metrics)  # a bad DMP_API_KEYS stops the start here
    install_error_handlers(app)
    for module in (generate, files, batches, v1, patches, gates, models, health, metrics):
        app.include_router(module.router)
    app.add_middleware(Gatekeeper, settings=settings)  # inside RequestContext: its refusals are counted and carry ids
    app.add_middleware(RequestContext, metrics=app.state.engine.metrics)
    app.add_middleware(ConsoleHeaders)
    app.mount("/ui", StaticFiles(directory=STATIC_DIR, html=True), name="ui")  # shipped as package data

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse("/ui/")

    return app
