"""/patches: list, describe, upload (hot swap) and delete patches."""
from __future__ import annotations

import base64
import binascii
import logging
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.api.deps import RegistryDep, SettingsDep
from app.api.keys import KEY_OPTIONAL, Caller, PatchAdminDep, ReaderDep
from app.api.responses import errors
from app.api.schemas import PatchDetail, PatchHistory, PatchInfo, PatchList
from app.core.apikeys import ID_RE
from app.core.errors import ClientGone, Forbidden, InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from app.core.signing import MAX_SIGNATURE_BYTES, BadSignature
from app.registry.records import NAME_PATTERN, PatchRecord, public_metadata
from app.registry.registry import PatchRegistry

log = logging.getLogger("dmp.api")
router = APIRouter(prefix="/patches", tags=["patches"])
PatchName = Annotated[str, Path(pattern=NAME_PATTERN, description="Letters, digits, '.', '_', '-'; at most 64")]
Owner = Annotated[str | None, Query(pattern=f"^({ID_RE.pattern[1:-1]})?$",
                                    description="The operator's token only: the tenant the patch belongs to (a "
                                                "tenant of DMP_API_KEYS); empty = shared. Omitted: a new name is "
                                                "shared, a replaced one keeps its owner; a tenant's admin key always "
                                                "uploads for its own tenant")]
UPLOAD_BODY = {"requestBody": {"required": True, "description": "The patch file (docs/design.md §3 safetensors)",
                               "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                   "format": "binary"}}}},
               "parameters": [{"name": "X-DMP-Signature", "in": "header", "required": False,
                               "schema": {"type": "string"},
                               "description": "The patch's model-signing bundle (the .sig file), base64; required "
                                              "when the server sets DMP_PATCH_PUBLIC_KEYS"}]}


def _detail(registry: PatchRegistry, record: PatchRecord) -> PatchDetail:
    return PatchDetail(**registry.summary(record), metadata=public_metadata(record.metadata),
                       versions_held=registry.held_versions(record.name))


def _signature(header: str | None) -> bytes | None:
    """The X-DMP-Signature header's bundle bytes (strict base64), before any body is read."""
    if header is None:
        return None
    if len(header) > MAX_SIGNATURE_BYTES * 4 // 3 + 4:
        raise BadSignature(f"X-DMP-Signature is over {MAX_SIGNATURE_BYTES} bytes once decoded")
    try:
        return base64.b64decode(header.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadSignature("X-DMP-Signature is not base64 (send the .sig file base64-encoded)") from None


def _owner(caller: Caller, owner: str | None) -> dict:
    """`registry.put`'s owner arguments: only the operator names an owner, and only a tenant of DMP_API_KEYS."""
    if owner is None:
        return {}
    if not caller.operator:
        raise Forbidden("only the operator's token sets a patch's owner; a tenant's admin key uploads for its tenant",
                        error_type="owner_not_allowed")
    ring = caller.gate.ring
    if owner and (ring is None or owner not in ring.tenants):
        raise InvalidRequest(f"no tenant named {owner!r} in DMP_API_KEYS", error_type="unknown_tenant")
    return {"owner": owner or None, "set_owner": True}


@router.get("", response_model=PatchList, responses=errors(401, 503), openapi_extra=KEY_OPTIONAL,
            summary="The patches the caller sees and their states")
def list_patches(registry: RegistryDep, caller: ReaderDep):
    return PatchList(patches=[PatchInfo(**registry.summary(r)) for r in registry.list(caller.tenant)])


@router.get("/{name}", response_model=PatchDetail, responses=errors(401, 404, 422, 503), openapi_extra=KEY_OPTIONAL,
            summary="One patch")
def get_patch(name: PatchName, registry: RegistryDep, caller: ReaderDep):
    return _detail(registry, registry.get(name, caller.tenant))


@router.get("/{name}/history", response_model=PatchHistory, responses=errors(401, 404, 422, 503),
            openapi_extra=KEY_OPTIONAL,
            summary="Versions of a name this replica installed or deleted since it started, newest first")
def patch_history(name: PatchName, registry: RegistryDep, caller: ReaderDep):
    history = registry.history(name, caller.tenant)
    record = registry.records.get(name)
    return PatchHistory(name=name, current=record.version if record else None, history=history)


@router.put("/{name}", response_model=PatchDetail, openapi_extra=UPLOAD_BODY,
            responses={201: {"model": PatchDetail, "description": "Created"}}
            | errors(401, 403, 404, 409, 413, 415, 422, 503),
            summary="Upload a patch version (hot swap; the admin token, or a tenant's admin-scoped API key)")
async def put_patch(name: PatchName, request: Request, response: Response, registry: RegistryDep,
                    settings: SettingsDep, caller: PatchAdminDep, owner: Owner = None):
    assignment = _owner(caller, owner)
    signature = _signature(request.headers.get("x-dmp-signature"))
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/octet-stream":
        registry.metrics.patch_refusals.labels("content_type").inc()
        raise UnsupportedMediaType(f"send the patch as application/octet-stream, not {content_type or 'nothing'!r}")
    data = bytearray()
    try:
        async for chunk in request.stream():  # count what arrives; Content-Length is not trusted
            data += chunk
            if len(data) > settings.max_patch_bytes:
                registry.metrics.patch_refusals.labels("too_large").inc()
                raise PayloadTooLarge(f"patch is over the {settings.max_patch_bytes}-byte cap (DMP_MAX_PATCH_BYTES)")
    except ClientDisconnect:  # the uploader went away mid-body: nothing changed, nothing to trace
        log.warning("upload of patch %s aborted by the client after %d bytes", name, len(data))
        raise ClientGone("the client closed the connection during the upload") from None
    record, created = await run_in_threadpool(lambda: registry.put(name, bytes(data), signature, caller.tenant,
                                                                   **assignment))
    response.status_code = 201 if created else 200
    return _detail(registry, record)


@router.delete("/{name}", response_model=PatchDetail, responses=errors(401, 403, 404, 422, 503),
               summary="Remove a patch (the admin token, or the owning tenant's admin-scoped API key)")
def delete_patch(name: PatchName, registry: RegistryDep, caller: PatchAdminDep):
    record = registry.delete(name, caller.tenant)
    return _detail(registry, record)
