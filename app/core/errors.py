"""One error hierarchy for the service, mapped to `{"error", "error_type"}` responses in one place."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dmp.errors")
NOT_AN_OBJECT = ("dict_type", "model_attributes_type")
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


class ServiceError(Exception):
    """An error with an HTTP status and a machine-readable `error_type`."""

    status = 500
    error_type = "internal"

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


class PayloadTooLarge(ServiceError):
    status, error_type = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, error_type = 415, "unsupported_media_type"


class InvalidRequest(ServiceError):
    status, error_type = 422, "invalid_request"


class InvalidPatch(ServiceError):
    status, error_type = 422, "invalid_patch"


class PatchNotReady(ServiceError):
    status, error_type = 422, "patch_not_ready"


class Overloaded(ServiceError):
    status, error_type = 429, "overloaded"


class Unavailable(ServiceError):
    status, error_type = 503, "unavailable"


def error_response(status: int, message: str, error_type: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def _remember(request: Request, error_type: str) -> None:
    request.scope["dmp.error_type"] = error_type  # read by the metrics middleware


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _allowed_methods(request: Request, default: str) -> str:
    """Every method the matched path template has, from the OpenAPI document (routers are nested)."""
    template = getattr(request.scope.get("route"), "path", None)
    ops = request.app.openapi().get("paths", {}).get(template, {})
    return ", ".join(sorted(m.upper() for m in ops if m.upper() in HTTP_METHODS)) or default


def install_error_handlers(app: FastAPI) -> None:
    """Map ServiceError, validation errors, malformed JSON, HTTP errors and crashes to the error shape."""

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError):
        _remember(request, exc.error_type)
        return error_response(exc.status, exc.message, exc.error_type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            _remember(request, "invalid_json")
            return error_response(400, "request body is not valid JSON", "invalid_json")
        if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") in NOT_AN_OBJECT for e in exc.errors()):
            _remember(request, "invalid_json")
            return error_response(400, "request body must be a JSON object (Content-Type: application/json)",
                                  "invalid_json")
        _remember(request, "validation_error")
        return error_response(422, _validation_message(exc), "validation_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "http_error")
        _remember(request, kind)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # one Route per method: Starlette's Allow names only the first match
            headers["Allow"] = _allowed_methods(request, headers.get("Allow", ""))
        return error_response(exc.status_code, str(exc.detail), kind, headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        _remember(request, "internal")
        return error_response(500, "internal server error", "internal")
