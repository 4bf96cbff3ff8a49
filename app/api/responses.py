"""OpenAPI declarations of the error replies each route can give."""
from __future__ import annotations

from app.api.schemas import ErrorBody

DESCRIPTIONS = {
    400: "Malformed request (e.g. a body that is not JSON)",
    401: "Missing or wrong admin token (admin routes) or API key (generation routes, when DMP_API_KEYS is set)",
    403: "A valid credential without the right: an API key without the admin scope, a tenant acting on a shared "
         "patch or naming an owner",
    404: "Unknown model or patch (another tenant's patch answers the same), or admin routes disabled",
    409: "The patch name is taken by another tenant's patch",
    413: "Body too large (patch uploads: DMP_MAX_PATCH_BYTES; /generate: 1 MiB)",
    415: "Upload not sent as application/octet-stream",
    422: "Invalid request or refused patch",
    429: "Admission queue full (DMP_MAX_QUEUE), the request cannot finish before its deadline (deadline_unreachable) "
         "or the API key's rate limit reached; see Retry-After",
    500: "Unexpected server error",
    503: "Not ready, draining, registry unreachable, or deadline exceeded",
}


def errors(*codes: int) -> dict:
    """`responses=` entries for these status codes (and 500), all with the error body."""
    return {code: {"model": ErrorBody, "description": DESCRIPTIONS[code]} for code in (*codes, 500)}
