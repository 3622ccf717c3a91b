"""The admin endpoints: pdp's revocation list and the client-identity inventory, over HTTP.

- ``GET /admin/revocations``: the list in force (from the store);
- ``POST /admin/revocations``: ``{"kind": "cert"|"token"|"subject", "value": ..., "reason": ..., "ttl": "7d"}``
  revokes at once on every replica sharing the store (201);
- ``DELETE /admin/revocations/{kind}/{value}``: takes an entry off (404 when it was not on);
- ``GET /admin/identities?expiring=7d``: the inventory, by notAfter.

Served only with ``server.admin = true``, which the config loader accepts only on
a mutual-TLS listener that admits named callers (``server.tls.allowed_callers``)
and with ``server.admin_callers`` named (never every gateway); each request is
checked again here against ``server.admin_callers`` and pdp's revocation list
(``caller_refusal``: a revoked admin certificate administers nothing), so no
other listener or caller reaches them. Every change is logged with the caller's
name.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pdp.certificates.inventory import expiring, read_records
from pdp.certificates.revocation_list import (
    KINDS,
    Revocation,
    RevocationError,
    RevocationList,
    normalize,
    read_revocations,
    remove_revocation,
    store_revocation,
)
from pdp.durations import parse_duration
from pdp.service.listener_tls import ListenerTls, caller_names, caller_refusal
from pdp.service.revocation_sync import RevocationSync
from pdp.store import Store, StoreUnavailable
from pdp.stored_values import shown

log = logging.getLogger("pdp")

MAX_BODY = 16 * 1024
_NO_STORE = {"cache-control": "no-store"}


class _Refused(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error = status, error


class Admin:
    def __init__(self, store: Store, sync: RevocationSync, tls: ListenerTls | None,
                 admin_callers: tuple[str, ...]) -> None:
        self.store = store
        self.sync = sync
        self.tls = tls
        self.callers = admin_callers

    def routes(self) -> list[Route]:
        return [Route("/admin/revocations", self._guarded(self.list_revocations), methods=["GET"]),
                Route("/admin/revocations", self._guarded(self.add_revocation), methods=["POST"]),
                Route("/admin/revocations/{kind}/{value:path}", self._guarded(self.remove_revocation),
                      methods=["DELETE"]),
                Route("/admin/identities", self._guarded(self.identities), methods=["GET"])]

    def _caller(self, request: Request) -> str:
        """The admin caller's name, from the certificate of the mutual-TLS connection; refused otherwise."""
        tls = request.scope.get("extensions", {}).get("tls") or {}
        der = tls.get("client_cert_der")
        # The loader refuses server.admin without this; checked again so no other wiring can expose it.
        if self.tls is None or self.tls.client_ca is None or not self.callers or not der:
            raise _Refused(404, "not_found", "no admin endpoints on this listener")
        refusal = caller_refusal(self.callers, der, self.sync.revocations, time.time())
        if refusal is not None:
            raise _Refused(403, refusal[0], "this caller may not administer pdp" if refusal[0] ==
                           "caller_not_allowed" else refusal[1])
        return shown(min(caller_names(der)), 256)  # a URI SAN may hold control characters: not in a log line

    def _guarded(self, handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                caller = self._caller(request)
                return await handler(request, caller)  # type: ignore[no-any-return]
            except _Refused as exc:
                return JSONResponse({"error": exc.error, "message": str(exc)}, status_code=exc.status,
                                    headers=_NO_STORE)
            except RevocationError as exc:
                return JSONResponse({"error": "invalid_request", "message": str(exc)}, status_code=400,
                                    headers=_NO_STORE)
            except StoreUnavailable:
                return JSONResponse({"error": "store_unavailable", "message": "the shared store did not answer; "
                                     "nothing was changed"}, status_code=503, headers=_NO_STORE)

        return endpoint

    async def list_revocations(self, request: Request, caller: str) -> Response:
        version, entries = await run_in_threadpool(read_revocations, self.store)
        now = time.time()
        current = RevocationList(entries, version=version, now=now).entries(now)
        return JSONResponse({"version": version, "revocations": [e.view() for e in current]}, headers=_NO_STORE)

    async def add_revocation(self, request: Request, caller: str) -> Response:
        doc = await _json_body(request)
        kind, value, reason, ttl = doc.get("kind"), doc.get("value"), doc.get("reason", ""), doc.get("ttl")
        if kind not in KINDS or not isinstance(value, str) or not isinstance(reason, str):
            raise RevocationError(f"kind must be one of {', '.join(KINDS)}, value and reason strings")
        seconds = _ttl(ttl)
        now = time.time()
        entry = Revocation(kind, normalize(kind, value), reason, now,
                           now + seconds if seconds is not None else None, f"{caller} (admin endpoint)")
        entry = await run_in_threadpool(store_revocation, self.store, entry)
        await run_in_threadpool(self.sync.refresh)  # this replica at once; the others on the change notice
        log.warning("revoked %s %s by %s (%s)", kind, entry.value, caller, reason or "no reason given")
        return JSONResponse({"revoked": entry.view()}, status_code=201, headers=_NO_STORE)

    async def remove_revocation(self, request: Request, caller: str) -> Response:
        kind, value = request.path_params["kind"], request.path_params["value"]
        if kind not in KINDS:
            raise _Refused(404, "not_found", f"unknown kind {kind[:16]!r}")
        normalized = normalize(kind, value)
        if not await run_in_threadpool(remove_revocation, self.store, kind, normalized):
            raise _Refused(404, "not_found", f"{kind} {normalized} is not on the revocation list")
        await run_in_threadpool(self.sync.refresh)
        log.warning("revocation of %s %s removed by %s", kind, normalized, caller)
        return JSONResponse({"removed": {"kind": kind, "value": normalized}}, headers=_NO_STORE)

    async def identities(self, request: Request, caller: str) -> Response:
        within = request.query_params.get("expiring")
        try:
            seconds = parse_duration(within) if within is not None else None
        except ValueError as exc:
            raise RevocationError(str(exc)) from None
        now = time.time()
        records = await run_in_threadpool(lambda: read_records(
            self.store, expiring_by=now + seconds if seconds is not None else None))
        chosen = expiring(records, now, seconds)
        return JSONResponse({"identities": [r.view() for r in chosen]}, headers=_NO_STORE)


def _ttl(value: object) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, str):
            return parse_duration(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return parse_duration(str(value))
    except ValueError as exc:
        raise RevocationError(str(exc)) from None
    raise RevocationError("ttl is a duration such as \"7d\", or seconds")


async def _json_body(request: Request) -> dict[str, Any]:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise RevocationError(f"the request body is larger than {MAX_BODY} bytes")
    try:
        doc = json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise RevocationError("the request body is not JSON") from None
    if not isinstance(doc, dict):
        raise RevocationError("the request body is not a JSON object")
    return doc
