"""GET /models: what each base is, enough for a client to build a matching patch."""
from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import EngineDep
from app.api.keys import KEY_OPTIONAL, ReaderDep
from app.api.responses import errors
from app.api.schemas import ModelInfo, ModelList

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelList, responses=errors(401), openapi_extra=KEY_OPTIONAL,
            summary="Served base models, with the patches the caller sees")
def list_models(engine: EngineDep, caller: ReaderDep):
    records = engine.registry.list(caller.tenant) if engine.registry else []
    return ModelList(models=[ModelInfo(**b.describe(), patches=[r.name for r in records if r.base == b.name])
                             for b in engine.bases.values()])
