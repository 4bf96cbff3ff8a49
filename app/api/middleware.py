"""Pure ASGI middleware: X-Request-ID echo and per-route request metrics (keeps disconnect detection intact)."""
from __future__ import annotations

import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders

from app.core.metrics import Metrics

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        status = [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, scope["method"], str(status[0]),
                                         scope.get("dmp.error_type", "")).inc()
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - started)
