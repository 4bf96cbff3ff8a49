"""/patches/{name}/gates: a patch's gate weights per block x prompt over timesteps, as JSON or a heatmap
(computed by app.engine.gatemaps: admitted, bounded, on the runner thread; behind DMP_API_KEYS when keys are on)."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from app.api.keys import KEY_OPTIONAL, KeyDep
from app.api.patches import PatchName
from app.api.responses import errors
from app.engine.gatemaps import GateMaps
from app.model.sampling import TRAIN_TIMESTEPS

router = APIRouter(prefix="/patches", tags=["patches"])

ClassLabel = Annotated[str | None, Query(max_length=200, description="Class id or name (class bases); omitted: the "
                                                                     "mean over all classes")]
Caption = Annotated[str | None, Query(max_length=1000, description="Caption (text bases); omitted: the null "
                                                                   "caption")]
Timesteps = Annotated[int, Query(ge=2, le=TRAIN_TIMESTEPS,
                                 description=f"How many timesteps, evenly spaced over [0, {TRAIN_TIMESTEPS - 1}]; "
                                             "at most DMP_GATE_MAX_VALUES / (blocks x prompts)")]
ERRORS = errors(400, 401, 404, 422, 429, 503)


def get_maps(request: Request) -> GateMaps:
    return request.app.state.gate_maps


MapsDep = Annotated[GateMaps, Depends(get_maps)]


@router.get("/{name}/gates", responses={200: {"content": {"application/json": {}}}} | ERRORS,
            response_class=Response, openapi_extra=KEY_OPTIONAL,
            summary="Softmax gate weights [block][timestep][prompt] of a patch for one condition")
async def gates(name: PatchName, maps: MapsDep, caller: KeyDep, class_label: ClassLabel = None,
                caption: Caption = None, timesteps: Timesteps = 50):
    await caller.charge(0)
    body = await maps.get(name, class_label, caption, timesteps, png=False)
    return Response(body, media_type="application/json")


@router.get("/{name}/gates.png", responses={200: {"content": {"image/png": {}}}} | ERRORS,
            response_class=Response, openapi_extra=KEY_OPTIONAL,
            summary="Heatmap of a patch's gate weights, one panel per block (paper Fig. 5)")
async def gates_png(name: PatchName, maps: MapsDep, caller: KeyDep, class_label: ClassLabel = None,
                    caption: Caption = None, timesteps: Timesteps = 50):
    await caller.charge(0)
    body = await maps.get(name, class_label, caption, timesteps, png=True)
    return Response(body, media_type="image/png", headers={"Cache-Control": "no-cache"})
