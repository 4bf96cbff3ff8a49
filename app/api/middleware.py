"""Pure ASGI middleware: X-Request-ID echo and log context, per-route request metrics, early 413 on declared sizes.

Pure ASGI (not BaseHTTPMiddleware) so the route can still see the client disconnect.
"""
from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders

from app.api.errors import error_response
from app.core import logs
from app.core.metrics import Metrics

log = logging.getLogger("dmp.api")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    def __init__(self, app, metrics: Metrics, body_limits: dict[tuple[str, str], int]):
        self.app, self.metrics, self.body_limits = app, metrics, body_limits  # (method, path) -> bytes

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
        limit = self.body_limits.get((scope["method"], scope["path"]))
        declared = Headers(scope=scope).get("content-length", "")
        app = self.app
        if limit is not None and declared.isdigit() and int(declared) > limit:
            # the route's own limit also counts streamed bytes; this answers a declared size in our error shape
            scope["dmp.error_type"] = "payload_too_large"
            app = error_response(413, f"request body is over {limit} bytes", "payload_too_large")
        try:
            await app(scope, receive, send_with_id)
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
            self.metrics.requests.labels(path, scope["method"], str(status[0]),
                                         scope.get("dmp.error_type", "")).inc()
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - started)
            logs.request_id.reset(context)


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
