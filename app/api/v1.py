"""OpenAI-compatible routes: GET /v1/models (bases and ready patches) and POST /v1/images/generations."""
from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.routing import compile_path

from app.api.deps import EngineDep
from app.api.errors import HTTP_METHODS
from app.api.keys import KEY_OPTIONAL, KeyDep
from app.api.schemas import PatchUse
from app.api.stream import b64, outcome, sse, sse_response
from app.api.v1_errors import OpenAIError, OpenAIRoute, openai_error
from app.api.v1_schemas import ImageData, ImageRequest, ImagesResponse, ModelCard, ModelCardList, OpenAIErrorBody
from app.core.errors import NotFound, ServiceError
from app.engine.bases import ServedBase
from app.engine.engine import Engine
from app.engine.validation import base_name
from app.engine.work import Done, Spec, Step, Work
from app.registry.records import PatchRecord

log = logging.getLogger("dmp.api")
router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)
STARTED = int(time.time())  # `created` of the bases: they are loaded when the process starts
PARAMS = {"num_images": "n", "output_format": "output_format", "steps": "steps", "sampler": "sampler"} | {
    extra: extra for extra in ("patch_scale", "patches", "seeds", "negative_class_label")}
Responses = dict[int | str, dict[str, Any]]  # the `responses` of a route (OpenAPI)
ERRORS: Responses = {code: {"model": OpenAIErrorBody, "description": text} for code, text in {
    400: "Invalid request (BadRequestError)", 401: "Missing or wrong API key (AuthenticationError)",
    404: "Unknown model (NotFoundError)", 429: "Queue full or the key's rate limit (RateLimitError); see Retry-After",
    500: "Unexpected server error", 503: "Not ready, draining, or deadline exceeded"}.items()}
# FastAPI declares a 422 for every route with a body; here invalid bodies answer 400 like every other bad request
NO_422: Responses = {422: {"model": OpenAIErrorBody, "description": "Never sent: invalid bodies answer 400 on /v1"}}
STREAM: Responses = {200: {"description": "ImagesResponse JSON; with stream=true Server-Sent Events "
                               "image_generation.partial_image / image_generation.completed",
                "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def _sizes(base: ServedBase) -> list[str]:
    return [f"{base.image_size}x{base.image_size}"]


def _base_card(base: ServedBase) -> ModelCard:
    return ModelCard(id=base.name, created=STARTED, owned_by="dmp", parent=None, task=base.task, sizes=_sizes(base))


def _patch_card(engine: Engine, record: PatchRecord) -> ModelCard | None:
    """A ready patch of a served base as a model card; None for any other."""
    if record.state != "ready" or record.base not in engine.bases or record.name in engine.bases:
        return None
    base = engine.bases[record.base]
    return ModelCard(id=record.name, created=int(record.updated_at), owned_by=record.base, parent=record.base,
                     task=base.task, sizes=_sizes(base))


@router.get("/models", response_model=ModelCardList, responses=ERRORS, summary="Bases and ready patches",
            openapi_extra=KEY_OPTIONAL)
def list_models(engine: EngineDep, caller: KeyDep):
    cards = [_base_card(b) for b in engine.bases.values()]
    records = engine.registry.list(caller.tenant) if engine.registry else []
    patches = [_patch_card(engine, r) for r in records]
    return ModelCardList(data=cards + [c for c in patches if c is not None])


@router.get("/models/{model_id}", response_model=ModelCard, responses=ERRORS | NO_422,
            summary="One base or ready patch (client.models.retrieve)", openapi_extra=KEY_OPTIONAL)
def retrieve_model(model_id: str, engine: EngineDep, caller: KeyDep):
    if model_id in engine.bases:
        return _base_card(engine.bases[model_id])
    card = None
    if engine.registry is not None:
        try:
            card = _patch_card(engine, engine.registry.get(model_id, caller.tenant))
        except NotFound:
            pass
    if card is None:
        raise OpenAIError(f"no model named {model_id!r}; GET /v1/models lists them", status=404,
                          error_type="model_not_found", param="model")
    return card


@router.post("/images/generations", response_model=ImagesResponse, responses=STREAM | ERRORS | NO_422,
             summary="OpenAI images.generate: model = a base or a patch", openapi_extra=KEY_OPTIONAL)
async def generate_images(body: ImageRequest, request: Request, engine: EngineDep, caller: KeyDep):
    engine.check_admitting()
    spec, size = image_spec(engine, body, caller.tenant)
    await caller.charge(spec.num_images)
    if body.stream:
        work = await engine.open(spec, follow=True, previews=body.partial_images or 0,
                                 preview_format=spec.output_format, tenant=caller.tenant)
        return sse_response(_events(request, work, size))
    return images_response(spec, size, await outcome(await engine.open(spec, tenant=caller.tenant), request))


def image_spec(engine: Engine, body: ImageRequest, tenant: str | None) -> tuple[Spec, str]:
    """The request as the engine's Spec and the reply's `size`, for the caller's tenant; refusals in OpenAI's terms
    (batch lines too)."""
    model, patch = _model(engine, body.model, tenant)
    try:
        spec = engine.resolve(model=model, patch=patch, num_images=body.n, steps=body.steps, sampler=body.sampler,
                              guidance_scale=body.guidance_scale, seed=body.seed,
                              output_format=body.output_format or "png", patch_scale=body.patch_scale,
                              patches=None if body.patches is None else [p.model_dump() for p in body.patches],
                              seeds=body.seeds, negative_class_label=body.negative_class_label,
                              tenant=tenant,
                              **_condition(engine, model, patch or (body.patches[0].name if body.patches else None),
                                           body.prompt, tenant))
    except ServiceError as e:
        raise _in_openai_terms(e) from None
    size = _size(engine.bases[spec.model], body.size)
    if body.response_format == "url":
        raise OpenAIError("response_format url is not served: images are returned as b64_json", status=400,
                          error_type="unsupported_value", param="response_format")
    return spec, size


def images_response(spec: Spec, size: str, done: Done) -> ImagesResponse:
    used = [PatchUse(name=name, version=version, scale=scale)
            for (name, scale), version in zip(spec.patches, done.versions or (), strict=True)]
    return ImagesResponse(created=int(time.time()), data=[ImageData(b64_json=b64(f)) for f in done.files],
                          output_format=spec.output_format, size=size, seed=spec.seed, seeds=list(spec.seeds),
                          model=spec.model, patches=used)


async def _events(request: Request, work: Work, size: str):
    """image_generation.partial_image per image at each preview step (`image_index`, our extra field, says which
    of the n images), then image_generation.completed per image."""
    common = {"background": "opaque", "output_format": work.spec.output_format, "quality": "auto", "size": size}
    partials = 0
    try:
        async for event in work.events():
            if isinstance(event, Step) and event.preview is not None:
                for i, f in enumerate(event.preview):
                    yield _event("image_generation.partial_image", common, b64_json=b64(f),
                                 partial_image_index=partials, image_index=i)
                partials += 1
            elif isinstance(event, Done):
                usage = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                         "output_tokens": 0, "total_tokens": 0}  # not metered in tokens
                for i, f in enumerate(event.files):
                    yield _event("image_generation.completed", common, b64_json=b64(f), usage=usage, image_index=i)
    except ServiceError as e:  # the status line is out: the client raises APIError on a data line with "error"
        body = openai_error(request, e.status, e.message, e.error_type, getattr(e, "param", None)).body
        yield f"data: {bytes(body).decode()}\n\n"
    except Exception:
        log.exception("streamed image generation failed")
        yield f"data: {bytes(openai_error(request, 500, 'internal server error', 'internal').body).decode()}\n\n"


def _event(kind: str, common: dict, **fields) -> str:
    return sse(kind, {"type": kind, "created_at": int(time.time())} | common | fields)



def _model(engine: Engine, name: str | None, tenant: str | None) -> tuple[str | None, str | None]:
    """(base, patch) named by `model`: a base, or a patch the caller sees (whose base resolve fills in)."""
    if name is None or name in engine.bases:
        return name, None
    assert engine.registry is not None, "routes run once the engine has started"
    try:
        engine.registry.get(name, tenant)
    except NotFound:
        raise OpenAIError(f"no model named {name!r}; GET /v1/models lists them", status=404,
                          error_type="model_not_found", param="model") from None
    return None, name


def _in_openai_terms(e: ServiceError) -> ServiceError:
    """A refusal naming our field -> one naming OpenAI's parameter (the condition is the prompt, num_images n)."""
    if e.error_type == "unknown_class":
        return OpenAIError(f"the prompt of a class-conditional model is a class index or name; {e.message}",
                           status=400, error_type="unknown_class", param="prompt")
    param = PARAMS.get(getattr(e, "field", ""))
    if param is None:
        return e
    kind = "invalid_value" if e.error_type == "invalid_request" else e.error_type
    return OpenAIError(e.message, status=400, error_type=kind, param=param)


def _size(base: ServedBase, size: str | None) -> str:
    sizes = _sizes(base)
    if size in (None, "auto"):
        return sizes[0]
    if size not in sizes:
        raise OpenAIError(f"model {base.name} makes {' or '.join(sizes)} images (or size=auto), not {size}",
                          status=400, error_type="unsupported_size", param="size")
    return size


def _condition(engine: Engine, model: str | None, patch: str | None, prompt: str, tenant: str | None) -> dict:
    """The prompt as what the base's task takes: a caption, a class label (index or name), or nothing."""
    assert engine.registry is not None, "routes run once the engine has started"
    record = engine.registry.get(patch, tenant) if patch else None
    try:
        task = engine.bases[base_name(engine.bases, model, record)].task
    except (ServiceError, KeyError):
        return {}  # no such base, or none named: resolve says what is missing
    return {"text": {"caption": prompt}, "class": {"class_label": prompt}}.get(task, {})


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
def unknown_route(path: str, request: Request):
    """Unknown /v1 routes (404) and known ones with another method (405) answer in OpenAI's shape too."""
    # every /v1 router's routes (files and batches have their own), from the OpenAPI document's path templates
    allowed = sorted(m.upper() for template, ops in request.app.openapi().get("paths", {}).items()
                     if compile_path(template)[0].match(f"/v1/{path}") for m in ops if m.upper() in HTTP_METHODS)
    if allowed:
        raise OpenAIError(f"{request.method} is not allowed on /v1/{path}", status=405,
                          error_type="method_not_allowed", headers={"Allow": ", ".join(allowed)})
    raise OpenAIError(f"no route {request.method} /v1/{path}", status=404, error_type="not_found")
