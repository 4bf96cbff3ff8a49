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


def gate_route(png: bool, media_type: str, headers: dict[str, str] | None = None):
    """The handler of one gate-map route: the key check, then the map as `media_type` (JSON or PNG)."""

    async def route(name: PatchName, maps: MapsDep, caller: KeyDep, class_label: ClassLabel = None,
                    caption: Caption = None, timesteps: Timesteps = 50):
        await caller.charge(0)
        body = await maps.get(name, class_label, caption, timesteps, png=png, tenant=caller.tenant)
        return Response(body, media_type=media_type, headers=headers)

    return route


# `name` keeps each route's OpenAPI operationId what it was when each had its own function
router.add_api_route("/{name}/gates", gate_route(False, "application/json"), methods=["GET"], name="gates",
                     responses={200: {"content": {"application/json": {}}}} | ERRORS, response_class=Response,
                     openapi_extra=KEY_OPTIONAL,
                     summary="Softmax gate weights [block][timestep][prompt] of a patch for one condition")
router.add_api_route("/{name}/gates.png", gate_route(True, "image/png", {"Cache-Control": "no-cache"}),
                     methods=["GET"], name="gates_png",
                     responses={200: {"content": {"image/png": {}}}} | ERRORS, response_class=Response,
                     openapi_extra=KEY_OPTIONAL,
                     summary="Heatmap of a patch's gate weights, one panel per block (paper Fig. 5)")
