"""
The web site: the dashboard at C{/}, the JS client library at
C{/static/tickstock.js}, the WebSocket at C{/ws},
and C{/health} and C{/ready} for probes. One port for all of them.
"""

from __future__ import annotations

import importlib.resources
from typing import Callable

import orjson
from autobahn.twisted.resource import WebSocketResource
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

JSON = b"application/json"


class JSONStatus(Resource):
    """
    A probe: C{report()} returns C{(ok, body)} from state the components
    keep current, so a probe never waits on a dependency.
    """

    isLeaf = True

    def __init__(self, report: Callable[[], tuple[bool, dict[str, object]]]) -> None:
        super().__init__()
        self._report = report

    def render_GET(self, request: Request) -> bytes:
        ok, body = self._report()
        request.setResponseCode(200 if ok else 503)
        request.setHeader(b"content-type", JSON)
        request.setHeader(b"cache-control", b"no-store")
        return orjson.dumps(body)


def packaged(folder: str) -> File:
    """One of the packaged folders of static files: C{dashboard} or C{client}."""
    return File(str(importlib.resources.files("tickstock.web") / folder))


SECURITY_HEADERS = {
    b"content-security-policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
}


class SecureSite(Site):
    """A Site that puts the security headers on every response."""

    def getResourceFor(self, request: Request) -> Resource:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        if request.isSecure():
            request.setHeader(b"strict-transport-security", b"max-age=31536000")
        return super().getResourceFor(request)


def build_site(
    ws: WebSocketResource,
    health: JSONStatus,
    ready: JSONStatus,
    timeout: float,
    api: Resource | None = None,
    metrics: Resource | None = None,
) -> Site:
    """
    Assemble the site. C{timeout} bounds how long a connection may sit
    without finishing its HTTP request (slowloris), which Autobahn's own
    handshake timeout does not cover. C{api} is served at C{/api},
    C{metrics} at C{/metrics}.
    """
    root = packaged("dashboard")
    root.putChild(b"static", packaged("client"))
    root.putChild(b"ws", ws)
    root.putChild(b"health", health)
    root.putChild(b"ready", ready)
    if api is not None:
        root.putChild(b"api", api)
    if metrics is not None:
        root.putChild(b"metrics", metrics)
    site = SecureSite(root, timeout=timeout)
    site.displayTracebacks = False
    return site
