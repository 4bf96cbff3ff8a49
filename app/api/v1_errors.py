"""Errors on /v1/* in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, with the statuses the
`openai` client maps to its exceptions (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError,
429 RateLimitError). Our 422s become 400s there: the client has no use for the difference."""
from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.errors import reply_headers
from app.core.errors import ServiceError

log = logging.getLogger("dmp.api")
TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


class OpenAIError(ServiceError):
    """A ServiceError that names the request field at fault (OpenAI's `param`)."""

    def __init__(self, message: str, *, param: str | None = None, **kw):
        super().__init__(message, **kw)
        self.param = param


def openai_error(request: Request, status: int, message: str, code: str, param: str | None = None,
                 headers: dict | None = None) -> JSONResponse:
    request.scope["dmp.error_type"] = code  # read by the metrics middleware
    return JSONResponse(error_body(status, message, code, param), status_code=400 if status == 422 else status,
                        headers=headers)


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    """OpenAI's error object (also a failed batch line's body)."""
    status = 400 if status == 422 else status
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class OpenAIRoute(APIRoute):
    """A route whose every error (validation, auth, rate limit, engine) answers in OpenAI's shape."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                err = e.errors()[0] if e.errors() else {}
                loc = [str(p) for p in err.get("loc", ()) if p != "body"]
                if err.get("type") == "json_invalid" or not loc:
                    return openai_error(request, 400, "request body must be a JSON object", "invalid_json")
                return openai_error(request, 400, f"{'.'.join(loc)}: {err.get('msg', 'invalid')}",
                                    "invalid_value", param=loc[0])
            except ServiceError as e:
                return openai_error(request, e.status, e.message, e.error_type, getattr(e, "param", None),
                                    reply_headers(request, e))
            except StarletteHTTPException as e:
                return openai_error(request, e.status_code, str(e.detail), "http_error",
                                    headers=dict(e.headers or {}))

        return handle
