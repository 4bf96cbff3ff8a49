"""OpenAI-compatible Batches for /v1/images/generations; each line runs as that route's request would."""
from __future__ import annotations

import logging

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.api.batch_schemas import BatchList, BatchObject, BatchRequest, DeliveryList
from app.api.files import batches_of, owner
from app.api.keys import KEY_OPTIONAL, KeyDep, KeyGate
from app.api.v1 import ERRORS, NO_422, Responses, image_spec, images_response
from app.api.v1_errors import OpenAIError, OpenAIRoute, error_body
from app.api.v1_schemas import ImageRequest
from app.core.errors import DeadlineExceeded, ServiceError
from app.engine.engine import Engine
from app.registry import records

log = logging.getLogger("dmp.batch")
router = APIRouter(prefix="/v1", tags=["batch"], route_class=OpenAIRoute)
CONFLICT: Responses = {409: ERRORS[400] | {"description": "The batch is already finished"}}


@router.post("/batches", response_model=BatchObject, responses=ERRORS | NO_422, openapi_extra=KEY_OPTIONAL,
             summary="Start a batch of /v1/images/generations requests from an uploaded file")
async def create_batch(body: BatchRequest, request: Request, caller: KeyDep):
    for key, value in (body.metadata or {}).items():
        if len(key) > 64 or len(value) > 512:
            raise OpenAIError("metadata keys have at most 64 characters, values at most 512", status=400,
                              error_type="invalid_value", param="metadata")
    return await batches_of(request).create(owner(caller), body.input_file_id, body.metadata)


@router.get("/batches", response_model=BatchList, responses=ERRORS | NO_422, openapi_extra=KEY_OPTIONAL,
            summary="This key's batches, newest first")
async def list_batches(request: Request, caller: KeyDep, after: str | None = Query(None, max_length=64),
                       limit: int = Query(20, ge=1, le=100)):
    page, more = await run_in_threadpool(batches_of(request).batches, owner(caller), after, limit)
    return BatchList(data=page, first_id=page[0]["id"] if page else None, last_id=page[-1]["id"] if page else None,
                     has_more=more)


@router.get("/batches/{batch_id}", response_model=BatchObject, responses=ERRORS | NO_422, openapi_extra=KEY_OPTIONAL,
            summary="A batch, with live request_counts")
async def get_batch(batch_id: str, request: Request, caller: KeyDep):
    return await run_in_threadpool(batches_of(request).batch, owner(caller), batch_id)


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject, responses=ERRORS | NO_422 | CONFLICT,
             openapi_extra=KEY_OPTIONAL, summary="Cancel a batch: lines not yet run are skipped")
async def cancel_batch(batch_id: str, request: Request, caller: KeyDep):
    return await batches_of(request).cancel(owner(caller), batch_id)


@router.get("/batches/{batch_id}/webhook_deliveries", response_model=DeliveryList, responses=ERRORS | NO_422,
            openapi_extra=KEY_OPTIONAL, summary="Extra: the batch's webhook delivery attempts")
async def webhook_deliveries(batch_id: str, request: Request, caller: KeyDep):
    return DeliveryList(data=await run_in_threadpool(batches_of(request).deliveries, owner(caller), batch_id))


def line_answerer(engine: Engine, gate: KeyGate):
    """A batch line's body and its batch's owner -> (status, the body /v1/images/generations answers for the owner's
    tenant); waits-out errors are raised."""

    def tenant_of(owner_id: str) -> str | None:
        """The owner key's tenant (keys off: None, every patch); a key since removed sees the shared patches alone."""
        if gate.ring is None:
            return None
        key = gate.ring.keys.get(owner_id)
        return key.tenant if key is not None else records.NOBODY

    async def answer(body: dict, owner_id: str) -> tuple[int, dict]:
        try:
            request = ImageRequest.model_validate(body)
            if request.stream:
                raise OpenAIError("stream is not available in a batch", status=400, error_type="invalid_value",
                                  param="stream")
            tenant = tenant_of(owner_id)
            spec, size = image_spec(engine, request, tenant)
            work = await engine.open(spec, tenant=tenant, background=True)
            result = await work.outcome()
            await engine.interactive_quiet()  # the PNGs and the reply are batch work too
            return 200, images_response(spec, size, result).model_dump(mode="json")
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            return 400, error_body(400, f"{loc}: {err['msg']}", "invalid_value", loc or None)
        except ServiceError as e:
            if e.retry or isinstance(e, DeadlineExceeded):  # queue full, draining, waited too long: try again later
                raise
            return e.status, error_body(e.status, e.message, e.error_type, getattr(e, "param", None))
        except Exception:
            log.exception("batch line failed")
            return 500, error_body(500, "internal server error", "internal")

    return answer
