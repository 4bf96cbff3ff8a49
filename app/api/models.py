"""GET /models: what each base is, enough for a client to build a matching patch."""
from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import EngineDep
from app.api.responses import errors
from app.api.schemas import ModelInfo, ModelList

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelList, responses=errors(), summary="Served base models")
def list_models(engine: EngineDep):
    records = engine.registry.list() if engine.registry else []
    return ModelList(models=[ModelInfo(**b.describe(), patches=[r.name for r in records if r.base == b.name])
                             for b in engine.bases.values()])
