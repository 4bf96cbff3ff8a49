"""OpenAI-compatible routes: GET /v1/models (bases and ready patches) and POST /v1/images/generations."""
from __future__ import annotations

import base64
import logging
import time

from fastapi import APIRouter, Request

from app.api.deps import EngineDep
from app.api.keys import KEY_OPTIONAL, KeyDep
from app.api.produce import admit_followed, produce, produce_events
from app.api.progress import sse, sse_response
from app.api.v1_errors import OpenAIError, OpenAIRoute, openai_error
from app.api.v1_schemas import ImageData, OpenAIErrorBody, ImageRequest, ImagesResponse, ModelCard, ModelCardList
from app.core.errors import NotFound, ServiceError
from app.engine.bases import ServedBase
from app.engine.engine import Engine, class_id
from app.engine.work import Spec

log = logging.getLogger("dmp.api")
router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)
STARTED = int(time.time())  # `created` of the bases: they are loaded when the process starts
OUTPUT_FORMATS = ("png", "jpeg", "webp")
ERRORS = {code: {"model": OpenAIErrorBody, "description": text} for code, text in {
    400: "Invalid request (BadRequestError)", 401: "Missing or wrong API key (AuthenticationError)",
    404: "Unknown model (NotFoundError)", 429: "Queue full or the key's rate limit (RateLimitError); see Retry-After",
    500: "Unexpected server error", 503: "Not ready, draining, or deadline exceeded"}.items()}
# FastAPI declares a 422 for every route with a body; here invalid bodies answer 400 like every other bad request
NO_422 = {422: {"model": OpenAIErrorBody, "description": "Never sent: invalid bodies answer 400 on /v1"}}
STREAM = {200: {"description": "ImagesResponse JSON; with stream=true Server-Sent Events "
                               "image_generation.partial_image / image_generation.completed",
                "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def _sizes(base: ServedBase) -> list[str]:
    return [f"{base.image_size}x{base.image_size}"]


@router.get("/models", response_model=ModelCardList, responses=ERRORS, summary="Bases and ready patches",
            openapi_extra=KEY_OPTIONAL)
def list_models(engine: EngineDep, caller: KeyDep):
    cards = [ModelCard(id=b.name, created=STARTED, owned_by="dmp", parent=None, task=b.task, sizes=_sizes(b))
             for b in engine.bases.values()]
    for r in engine.registry.list() if engine.registry else []:
        if r.state == "ready" and r.base in engine.bases and r.name not in engine.bases:
            base = engine.bases[r.base]
            cards.append(ModelCard(id=r.name, created=int(r.updated_at), owned_by=r.base, parent=r.base,
                                   task=base.task, sizes=_sizes(base)))
    return ModelCardList(data=cards)


@router.post("/images/generations", response_model=ImagesResponse, responses=STREAM | ERRORS | NO_422,
             summary="OpenAI images.generate: model = a base or a patch", openapi_extra=KEY_OPTIONAL)
async def generate_images(body: ImageRequest, request: Request, engine: EngineDep, caller: KeyDep):
    started = time.perf_counter()
    engine.check_admitting()
    model, patch = _model(engine, body.model)
    spec = engine.resolve(model=model, patch=patch, num_images=_n(engine, body.n), steps=body.steps,
                          sampler=body.sampler, guidance_scale=body.guidance_scale, seed=body.seed,
                          output_format=_output_format(body), **_condition(engine, model, patch, body.prompt))
    size = _size(engine.bases[spec.model], body.size)
    if body.response_format == "url":
        raise OpenAIError("response_format url is not served: images are returned as b64_json", status=400,
                          error_type="unsupported_value", param="response_format")
    await caller.charge(spec.num_images)
    deterministic = body.seed is not None
    if body.stream:
        admitted = await admit_followed(engine, spec, deterministic, body.partial_images or 0, spec.output_format)
        return sse_response(_events(request, engine, spec, deterministic, admitted, started, size))
    out = await produce(engine, spec, deterministic, request, started)
    return ImagesResponse(created=int(time.time()), data=[ImageData(b64_json=_b64(f)) for f in out.files],
                          output_format=spec.output_format, size=size, seed=spec.seed, model=spec.model)


async def _events(request: Request, engine: Engine, spec: Spec, deterministic: bool, admitted, started: float,
                  size: str):
    """image_generation.partial_image per image at each preview step, then image_generation.completed per image."""
    common = {"background": "opaque", "output_format": spec.output_format, "quality": "auto", "size": size}
    partials = 0
    try:
        async for kind, data in produce_events(engine, spec, deterministic, admitted, started):
            if kind == "progress" and data[2] is not None:
                for f in data[2]:
                    yield _event("image_generation.partial_image", common, b64_json=_b64(f),
                                 partial_image_index=partials)
                partials += 1
            elif kind == "done":
                usage = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                         "output_tokens": 0, "total_tokens": 0}  # not metered in tokens
                for f in data.files:
                    yield _event("image_generation.completed", common, b64_json=_b64(f), usage=usage)
    except ServiceError as e:  # the status line is out: the client raises APIError on a data line with "error"
        body = openai_error(request, e.status, e.message, e.error_type, getattr(e, "param", None)).body
        yield f"data: {body.decode()}\n\n"
    except Exception:
        log.exception("streamed image generation failed")
        yield f"data: {openai_error(request, 500, 'internal server error', 'internal').body.decode()}\n\n"


def _event(kind: str, common: dict, **fields) -> str:
    return sse(kind, {"type": kind, "created_at": int(time.time())} | common | fields)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _model(engine: Engine, name: str | None) -> tuple[str | None, str | None]:
    """(base, patch) named by `model`: a base, or a patch (whose base resolve fills in)."""
    if name is None or name in engine.bases:
        return name, None
    try:
        engine.registry.get(name)
    except NotFound:
        raise OpenAIError(f"no model named {name!r}; GET /v1/models lists them", status=404,
                          error_type="model_not_found", param="model") from None
    return None, name


def _n(engine: Engine, n: int) -> int:
    if n > engine.settings.max_images:
        raise OpenAIError(f"n must be at most {engine.settings.max_images}", status=400, error_type="invalid_value",
                          param="n")
    return n


def _output_format(body: ImageRequest) -> str:
    fmt = body.output_format or "png"
    if fmt not in OUTPUT_FORMATS:
        raise OpenAIError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}", status=400,
                          error_type="invalid_value", param="output_format")
    return fmt


def _size(base: ServedBase, size: str | None) -> str:
    sizes = _sizes(base)
    if size in (None, "auto"):
        return sizes[0]
    if size not in sizes:
        raise OpenAIError(f"model {base.name} makes {' or '.join(sizes)} images (or size=auto), not {size}",
                          status=400, error_type="unsupported_size", param="size")
    return size


def _condition(engine: Engine, model: str | None, patch: str | None, prompt: str) -> dict:
    """The prompt as the base's condition: a caption, a class label (index or name), or nothing."""
    only = next(iter(engine.bases)) if len(engine.bases) == 1 else None
    name = model or (engine.registry.get(patch).base if patch else only)
    task = engine.bases[name].task if name in engine.bases else None  # unknown: resolve says what is missing
    if task == "text":
        return {"caption": prompt}
    if task == "class":
        text = prompt.strip()
        if text.isdigit():
            return {"class_label": int(text)}
        try:
            return {"class_label": class_id(engine.bases[name], text)}  # a class name, as in POST /generate
        except ServiceError as e:
            raise OpenAIError(f"model {name} is class-conditional: the prompt is a class index or name; {e.message}",
                              status=400, error_type="unknown_class", param="prompt") from None
    return {}


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
def unknown_route(path: str, request: Request):
    """Unknown /v1 routes (404) and known ones with another method (405) answer in OpenAI's shape too."""
    allowed = sorted(m for r in router.routes if r.path == f"/v1/{path}" and r.endpoint is not unknown_route
                     for m in r.methods)
    if allowed:
        raise OpenAIError(f"{request.method} is not allowed on /v1/{path}", status=405,
                          error_type="method_not_allowed", headers={"Allow": ", ".join(allowed)})
    raise OpenAIError(f"no route {request.method} /v1/{path}", status=404, error_type="not_found")
