"""The decision endpoints' side of ASGI, without a framework between them and the server.

``POST /v1/check`` and the auth sub-request endpoint answer every request a gateway forwards: they read
the ASGI scope and messages themselves and send their answer as two messages, as a starlette
``Response`` does, with the same headers. ``DecisionPaths`` hands those requests straight to them and
every other request (and the lifespan) to the starlette application, whose router answers 404 and 405
as before. What the endpoints decide stays in ``pdp.service.server``; this module only moves bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

log = logging.getLogger("pdp")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Endpoint = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(Exception):
    """The request body is (or says it is) larger than the endpoint reads."""


class Disconnected(Exception):
    """The client went away before its body arrived: there is no one to answer."""


def header_values(scope: Scope, name: bytes) -> list[str]:
    """Every value of the header ``name`` (lower case), in order, as text (latin-1, as starlette reads it)."""
    return [v.decode("latin-1") for k, v in scope["headers"] if k == name]


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body; ``BodyTooLarge`` past ``limit`` bytes (or a larger ``content-length``),
    ``Disconnected`` when the client leaves first."""
    declared = header_values(scope, b"content-length")
    if declared and declared[0].isdigit() and int(declared[0]) > limit:
        raise BodyTooLarge
    body = bytearray()
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            body += message.get("body", b"")
            if len(body) > limit:
                raise BodyTooLarge
            if not message.get("more_body", False):
                return bytes(body)
        elif kind == "http.disconnect":
            raise Disconnected


async def answer(send: Send, status: int, body: bytes, headers: Iterable[tuple[str, str]] = (),
                 content_type: str | None = None) -> None:
    """Send one response: the headers (names in lower case), ``content-length`` unless given, and
    ``content-type`` when named and not given, as a starlette ``Response`` sends them."""
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    names = {k for k, _ in raw}
    if b"content-length" not in names and not (status < 200 or status in (204, 304)):
        raw.append((b"content-length", str(len(body)).encode("latin-1")))
    if content_type is not None and b"content-type" not in names:
        raw.append((b"content-type", content_type.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


#: The answer to a request framed twice, after which the connection is closed.
FRAMED_TWICE = (b'{"allowed":false,"reason":"request_invalid","message":"a request with both Transfer-Encoding and '
                b'Content-Length is refused"}')


def framed_twice(scope: Scope) -> bool:
    """Whether the request has both ``Transfer-Encoding`` and ``Content-Length``: RFC 9112 §6.3 lets a server
    refuse it and requires it to close the connection after answering. A proxy in front may have framed the
    body by the other header, and the bytes after the body be read as a request of their own (smuggling)."""
    names = {name for name, _ in scope["headers"]}
    return b"transfer-encoding" in names and b"content-length" in names


class DecisionPaths:
    """ASGI: ``POST /v1/check`` and the auth sub-request prefix (any method) to their endpoints, the rest
    to ``app``. A path the router would not match the same way (a root path, a line break, which a
    route's pattern does not cross) goes to ``app`` too, so both readings agree. A request framed twice
    (``framed_twice``) reaches neither: it is answered 400 and its connection closed."""

    def __init__(self, app: Endpoint, *, check: Endpoint, ext_authz: Endpoint, prefix: str) -> None:
        self._app = app
        self._check = check
        self._ext_authz = ext_authz
        self._prefix = prefix
        self._under = prefix + "/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and framed_twice(scope):
            return await answer(send, 400, FRAMED_TWICE, [("connection", "close")], content_type="application/json")
        if scope["type"] == "http" and not scope.get("root_path"):
            path: str = scope["path"]
            if "\n" not in path:
                if path == "/v1/check" and scope["method"] == "POST":
                    return await self._check(scope, receive, send)
                if path == self._prefix or path.startswith(self._under):
                    return await self._ext_authz(scope, receive, send)
        await self._app(scope, receive, send)
