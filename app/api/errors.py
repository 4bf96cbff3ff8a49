"""The HTTP side of app/core/errors.py: every error becomes a `{"error", "error_type"}` reply, mapped here only."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import ServiceError

log = logging.getLogger("dmp.errors")
NOT_AN_OBJECT = ("dict_type", "model_attributes_type")
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


def error_response(status: int, message: str, error_type: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def reply_headers(request: Request, exc: ServiceError) -> dict[str, str]:
    """The error's own headers, plus Retry-After (DMP_RETRY_AFTER) when a later try may succeed."""
    if not exc.retry:
        return exc.headers
    return {"Retry-After": str(request.app.state.settings.retry_after)} | exc.headers


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
        return error_response(exc.status, exc.message, exc.error_type, reply_headers(request, exc))

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
        kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code,
                                                                                          "http_error")
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
