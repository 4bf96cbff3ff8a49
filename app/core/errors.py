"""The service's one error hierarchy: a message, a machine-readable `error_type` and the HTTP status it stands for.

No web imports: the model, engine and registry raise these, and app/api/errors.py turns them into
`{"error", "error_type"}` replies (adding `Retry-After` where `retry` says a later try may succeed).
"""
from __future__ import annotations


class ServiceError(Exception):
    """A refused or failed request; `status` is the HTTP status the API answers with."""

    status = 500
    error_type = "internal"
    retry = False  # True: the condition passes (queue full, starting, draining): the reply carries Retry-After

    def __init__(self, message: str, *, status: int | None = None, error_type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status or self.status
        self.error_type = error_type or self.error_type
        self.headers = headers or {}


class BadRequest(ServiceError):
    status, error_type = 400, "bad_request"


class Unauthorized(ServiceError):
    status, error_type = 401, "unauthorized"


class Forbidden(ServiceError):
    status, error_type = 403, "forbidden"


class NotFound(ServiceError):
    status, error_type = 404, "not_found"


class Conflict(ServiceError):
    status, error_type = 409, "conflict"


class PayloadTooLarge(ServiceError):
    status, error_type = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, error_type = 415, "unsupported_media_type"


class InvalidRequest(ServiceError):
    status, error_type = 422, "invalid_request"


class PatchError(ServiceError, ValueError):
    """A patch file (or patch arguments) refused as invalid; the message says why."""

    status, error_type = 422, "invalid_patch"


class PatchNotReady(ServiceError):
    status, error_type = 422, "patch_not_ready"


class ClientGone(ServiceError):
    """The client closed the connection before its answer was ready (nginx's 499)."""

    status, error_type = 499, "client_closed_request"


class Overloaded(ServiceError):
    status, error_type, retry = 429, "overloaded", True


class Unavailable(ServiceError):
    status, error_type, retry = 503, "unavailable", True


class NoFreeSlot(Unavailable):
    """A valid patch that cannot be installed now: every slot of its base holds a patch version."""

    error_type = "no_free_slot"


class DeadlineExceeded(ServiceError):
    """The request ran past DMP_REQUEST_TIMEOUT (waiting or running)."""

    status, error_type = 503, "deadline_exceeded"
