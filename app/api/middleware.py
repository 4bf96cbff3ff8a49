"""Pure ASGI middleware: X-Request-ID echo and log context, per-route request metrics, authentication before the
body and a body cap counted as it streams, console headers.

Pure ASGI (not BaseHTTPMiddleware) so the route can still see the client disconnect.
"""
from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request

from app.api.deps import bearer
from app.api.errors import HTTP_METHODS, error_response, reply_headers
from app.api.keys import api_bearer, require_key, require_patch_admin
from app.api.v1_errors import openai_error
from app.core import logs
from app.core.config import Settings
from app.core.errors import PayloadTooLarge, ServiceError
from app.core.metrics import Metrics

log = logging.getLogger("dmp.api")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        status, started_response = [500], [False]
        context = logs.request_id.set(request_id)  # every log line of this request carries it

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0], started_response[0] = message["status"], True
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if started_response[0]:
                raise  # half a response is out: nothing valid can follow
            # answered here rather than by Starlette's outermost handler, so the 500 carries X-Request-ID too
            log.exception("unhandled error on %s %s (request %s)", scope["method"], scope["path"], request_id)
            scope["dmp.error_type"] = "internal"
            await error_response(500, "internal server error", "internal")(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"  # any token parses as a method
            self.metrics.requests.labels(path, method, str(status[0]),
                                         scope.get("dmp.error_type", "")).inc()
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - started)
            logs.request_id.reset(context)


ADMIN_PATH = re.compile(r"^/patches/[^/]+$")  # PUT (upload) and DELETE: the admin token or an admin key
MULTIPART_SLACK = 64 * 1024  # a batch file upload's form framing on top of DMP_BATCH_MAX_FILE_BYTES of file
KEYED_PATH = re.compile(r"^/generate$|^/v1(/.*)?$|^/patches/[^/]+/gates(\.png)?$")  # DMP_API_KEYS, when set


class BodyTooLarge(HTTPException):
    """Raised into the app by `receive` once the cap is passed (an HTTPException, so FastAPI's body parsing passes
    it on instead of calling it a malformed body); the 413 is already sent by then."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is over {limit} bytes")


class Gatekeeper:
    """Authenticates a protected route from its headers alone, then caps its body as it streams.

    FastAPI reads and parses the whole body before any dependency runs, so the route's own key or admin check comes
    too late to spare the memory: here a request without its credentials is answered 401 (404 for admin routes
    while they are off) before one body byte is read, and a body past its route's cap (DMP_MAX_PATCH_BYTES on
    uploads, DMP_BATCH_MAX_FILE_BYTES on batch files, DMP_MAX_BODY_BYTES elsewhere) is answered 413 as soon as
    its declared or counted size passes it.
    Early answers close the connection, so the rest of an unread body is never received. The routes keep their
    own checks (the same functions run again as dependencies, and name the caller).
    """

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        admin = method in ("PUT", "DELETE") and ADMIN_PATH.match(path) is not None
        request = Request(scope)
        try:
            if admin:
                await require_patch_admin(request, await bearer(request))
            elif KEYED_PATH.match(path):
                await require_key(request, await api_bearer(request))
            limit = (self.settings.max_patch_bytes if admin else
                     self.settings.batch_max_file_bytes + MULTIPART_SLACK if (method, path) == ("POST", "/v1/files")
                     else self.settings.max_body_bytes)
            declared = Headers(scope=scope).get("content-length", "")
            if declared.isascii() and declared.isdigit() and int(declared) > limit:
                raise BodyTooLarge(limit)
        except (ServiceError, BodyTooLarge) as e:
            return await self._refuse(scope, send, e)

        answered, response_started, received = [False], [False], [0]

        async def capped_receive():
            if answered[0]:
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    if not response_started[0]:
                        await self._refuse(scope, send, BodyTooLarge(limit))
                        answered[0] = True
                    raise BodyTooLarge(limit)
            return message

        async def guarded_send(message):
            if answered[0]:
                return  # the 413 is out; whatever the app answers to the error it was handed goes nowhere
            response_started[0] = response_started[0] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except BodyTooLarge:
            if not answered[0]:
                raise

    async def _refuse(self, scope, send, error: ServiceError | BodyTooLarge) -> None:
        """The refusal in the route's error shape (OpenAI's on /v1)."""
        if isinstance(error, BodyTooLarge):
            error = PayloadTooLarge(error.detail)
        request = Request(scope)
        headers = reply_headers(request, error)
        if request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers:
            headers["Connection"] = "close"  # uvicorn then closes the socket instead of reading the body to reuse it
        if scope["path"].startswith("/v1"):
            response = openai_error(request, error.status, error.message, error.error_type, headers=headers)
        else:
            scope["dmp.error_type"] = error.error_type  # read by RequestContext's metrics
            response = error_response(error.status, error.message, error.error_type, headers)

        async def no_body():
            return {"type": "http.disconnect"}  # a Response never reads it; nothing of the body is received

        await response(scope, no_body, send)


# The console loads nothing from elsewhere: scripts, styles and fetches from this origin only; images also as data:
# URLs (results, previews, difference images). /docs (Swagger UI from a CDN) is left alone.
CONSOLE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class ConsoleHeaders:
    """Content-Security-Policy and friends on the console's files (/ui/...)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/ui"):
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = CONSOLE_CSP
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "no-referrer"
            await send(message)

        await self.app(scope, receive, send_with_headers)
