"""``pdp serve``: the decision service (starlette + uvicorn, and grpcio for Envoy's gRPC ext_authz).

HTTP routes: ``POST /v1/check`` (the JSON check protocol of
``pdp.adapters.json_check``), ``GET /healthz`` (the process is up),
``GET /readyz`` (policy and trust bundles are loaded), ``GET /metrics``
(Prometheus). Background threads re-read changed policy, trust-bundle and
JWKS files, and refresh remote key sets before they go stale, so no request
waits on that work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pdp import reasons
from pdp.adapters import http_authz, introspection
from pdp.adapters.asgi import scope_to_raw
from pdp.adapters.json_check import RequestDocumentError, document, parse_request, render
from pdp.adapters.json_check import answer as check_answer
from pdp.assemble import (
    build_key_sources,
    build_pdp,
    load_grpc_messages,
    load_jwks_file,
    load_policy,
    load_shadow_policy,
    load_trust,
    policy_files,
    shadow_policy_files,
)
from pdp.certificates.identity import CertIdentity
from pdp.config import Config
from pdp.credentials.jwks import RemoteKeySource, StaticKeySource, refresh_wait
from pdp.decision import Decision
from pdp.errors import Denied, NeedsNetwork
from pdp.pipeline import Pdp
from pdp.policy.engine import PolicyEngine
from pdp.policy.opa_remote import RemoteEngine
from pdp.request import CheckRequest
from pdp.request_reader import RawRequest, Via
from pdp.service.admin import Admin
from pdp.service.brute_force import FailureLimiter
from pdp.service.coalescing import CoalescingH11Protocol
from pdp.service.decision_log import setup_logging
from pdp.service.grpc_listener import GrpcListener, ListenError
from pdp.service.inventory_flusher import InventoryFlusher
from pdp.service.listener_tls import caller_gate, caller_names, tls_protocols, uvicorn_ssl_options
from pdp.service.metrics import CONTENT_TYPE, Metrics
from pdp.service.raw_asgi import (
    BodyTooLarge,
    DecisionPaths,
    Disconnected,
    Receive,
    Scope,
    Send,
    answer,
    header_values,
    read_body,
)
from pdp.service.reloader import Reloader, Watched
from pdp.service.revocation_sync import RevocationSync
from pdp.service.store_health import StoreHealth
from pdp.store import MemoryStore, SqliteStore, Store, StoreUnavailable

log = logging.getLogger("pdp")

Fetch = Callable[[str], bytes]


class Service:
    """The assembled decision point plus what keeps it current."""

    def __init__(self, config: Config, *, fetch: Fetch | None = None, store: Store | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.keys = build_key_sources(config, fetch)
        self.pdp: Pdp = build_pdp(config, keys=self.keys, sinks=(self.metrics.observe,),
                                  on_untrusted=self._untrusted_header, store=store,
                                  on_store_failure=self.metrics.introspection_store_failed)
        # Failed introspection secrets are counted in the shared store; kept in this process, they get a
        # store of their own, so a flood of failures cannot fill the DPoP replay store (nor the reverse).
        lockout = config.introspection.lockout
        self.introspection_limiter = FailureLimiter(
            lockout, MemoryStore(lockout.max_tracked) if isinstance(self.pdp.store, MemoryStore) else self.pdp.store,
            on_lockout=lambda scope: self.metrics.introspection_lockouts.labels(scope).inc())
        self.metrics.set_policy(self.pdp.policy.version, config.policy.engine)
        self._follow_revision(self.pdp.policy)
        if self.pdp.trial is not None:  # the shadow's comparisons and dry run's allows are counted
            self.pdp.trial.observer = self.metrics
        self.store_health = StoreHealth(self.pdp.store, on_probe=self.metrics.store_probed)
        self.reloader = Reloader(self._watched(), config.server.reload_interval, self._reloaded)
        self.revocation_sync = RevocationSync(self.pdp.store, self.pdp.revocations)
        self.inventory = InventoryFlusher(
            self.pdp.store, self.pdp.inventory, max_identities=config.inventory.max_identities,
            keep_expired=config.inventory.keep_expired) if self.pdp.inventory is not None else None
        self._stop = threading.Event()
        self._refreshers: list[threading.Thread] = []
        self._metrics_sync: threading.Thread | None = None
        self._closed = False
        self.grpc: GrpcListener | None = None

    # -- keeping current
    def _watched(self) -> list[Watched]:
        cfg = self.config
        parts = [
            Watched("policy", lambda: policy_files(cfg), self._reload_policy),
            *([Watched("policy.shadow", lambda: shadow_policy_files(cfg), self._reload_shadow)]
              if cfg.policy.shadow is not None else []),
            Watched("trust_bundles", lambda: [f for b in cfg.certificates.trust_bundles
                                              for f in (b.file, b.intermediates, *b.crls) if f is not None],
                    lambda: self.pdp.certificates.replace_bundles(load_trust(cfg))),
        ]
        for i, iss in enumerate(cfg.tokens.issuers):
            if iss.jwks_file is not None:
                parts.append(Watched(f"jwks:{iss.issuer}", _listing(iss.jwks_file),
                                     self._jwks_reloader(iss.issuer, iss.jwks_file, i)))
        return parts

    def _reload_policy(self) -> None:
        grpc_messages = load_grpc_messages(self.config)  # read first: a failure keeps both as they are
        engine = load_policy(self.config)
        self.pdp.grpc_messages = grpc_messages
        old, self.pdp.policy = self.pdp.policy, engine
        self.metrics.set_policy(engine.version, self.config.policy.engine)
        self._follow_revision(engine)
        if isinstance(old, RemoteEngine):  # its connections close as their decisions end
            old.on_revision = None
            old.close()

    def _follow_revision(self, engine: PolicyEngine) -> None:
        # A remote engine's version is the revision OPA names, which changes without a reload.
        if isinstance(engine, RemoteEngine):
            engine.on_revision = lambda revision: self.metrics.set_policy(revision, "opa")

    def _reload_shadow(self) -> None:
        shadow = load_shadow_policy(self.config)  # a failure keeps the last good one (``Reloader``)
        if self.pdp.trial is not None:
            self.pdp.trial.shadow = shadow

    def _jwks_reloader(self, issuer: str, path: Path, index: int) -> Callable[[], None]:
        def reload() -> None:
            fresh = load_jwks_file(path, f"tokens.issuers[{index}].jwks_file")
            source = self.keys.by_issuer[issuer]
            assert isinstance(source, StaticKeySource)
            source.replace(fresh)

        return reload

    def _reloaded(self, part: str, ok: bool, detail: str) -> None:
        self.metrics.reloads.labels(part.split(":")[0], "ok" if ok else "failed").inc()

    def refresh_keys(self) -> None:
        """One pass over every remote key set: fetch each that is missing or stale."""
        for source in self.keys.remote():
            self._refresh_source(source)

    def _refresh_source(self, source: RemoteKeySource) -> None:
        now = time.time()
        if source.stale(now) and source.would_fetch(now):
            source.refresh(now)
            if source.last_error is not None:
                self.metrics.jwks_refresh_failures.labels(source.name).inc()

    def sync_metrics(self) -> None:
        """Bring the metrics kept as running totals elsewhere (revocation fetches, the inventory, the
        revocation list) into the registry: at each scrape, and every few seconds, so that under
        ``--workers`` every worker's share is current whichever worker is scraped."""
        self.metrics.sync_revocation(self.pdp.certificates.revocation.stats.snapshot())
        self.metrics.set_revocation_list(len(self.pdp.revocations), self.revocation_sync.reachable)
        if self.inventory is not None:
            self.metrics.set_inventory(self.inventory.expiry_counts(), self.inventory.dropped)

    def reload_now(self) -> None:
        """Re-read every policy, trust-bundle and JWKS file at once, changed or not (``SIGHUP``). Safe to
        call from a signal handler: the reloader's thread does the work."""
        self.reloader.wake()

    def start(self) -> None:
        """Start the gRPC listener (binding its address: ``ListenError`` if it cannot), the reloader and
        the key refresher. Starting again is a no-op."""
        if self.config.server.grpc and self.grpc is None:
            self.grpc = GrpcListener(lambda: self.pdp, self.config.server.grpc,
                                     workers=self.config.server.grpc_workers, tls=self.config.server.tls,
                                     reuse_port=self.config.server.grpc_reuse_port)
            self.grpc.start()
        self.reloader.start()
        self.pdp.certificates.start()  # renews OCSP answers and fetched CRLs before they go stale
        self.revocation_sync.start()
        if self.inventory is not None:
            self.inventory.start()
        if self._metrics_sync is None:
            def sync() -> None:
                while not self._stop.wait(5.0):
                    try:
                        self.sync_metrics()
                    except Exception:  # a metric is never worth a dead thread
                        log.exception("updating metrics failed")

            self._metrics_sync = threading.Thread(target=sync, name="pdp-metrics", daemon=True)
            self._metrics_sync.start()
        if not self._refreshers:
            # One refresher per issuer: an issuer whose endpoint never answers holds up its own fetches
            # (each up to its jwks_timeout), never another issuer's.
            def loop(source: RemoteKeySource) -> None:
                while True:
                    try:
                        self._refresh_source(source)
                    except Exception:  # this issuer's keys are never worth a dead refresher
                        log.exception("refreshing the key set of %s failed", source.name)
                    # Awake when the set is due, not later: a removed key stops verifying within
                    # jwks_refresh_interval of the last fetch (plus the fetch itself).
                    if self._stop.wait(refresh_wait([source], time.time())):
                        return

            self._refreshers = [threading.Thread(target=loop, args=(source,), name=f"pdp-jwks-{i}", daemon=True)
                                for i, source in enumerate(self.keys.remote())]
            for thread in self._refreshers:
                thread.start()

    def stop(self) -> None:
        if self.grpc is not None:
            self.grpc.stop()
            self.grpc = None
        self._stop.set()
        self.reloader.stop()
        self.pdp.certificates.stop()
        self.revocation_sync.stop()
        if self.inventory is not None:
            self.inventory.stop()
        # Five seconds for them all, however many issuers wait on a fetch (the threads are daemons).
        deadline = time.monotonic() + 5
        for thread in (*self._refreshers, self._metrics_sync):
            if thread is not None:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._refreshers, self._metrics_sync = [], None
        if not self._closed:
            self._closed = True
            self.pdp.close()

    def readiness(self) -> dict[str, Any]:
        pdp = self.pdp
        # Anyone may ask: a fixed text for a failed fetch (the detail, with the URL, is in the log).
        jwks = {name: {"keys": len(ks) if (ks := s.current()) is not None else None,
                       "error": getattr(s, "public_error", None)}
                for name, s in self.keys.by_issuer.items()}
        # The store is probed at most once a second, however often this is asked (a blocking read: from a
        # worker thread, as readyz calls it).
        store = self.store_health.state()
        # A remote OPA (policy.engine = "opa") must answer too: its /health, probed at most once a second.
        opa = pdp.policy.health() if isinstance(pdp.policy, RemoteEngine) else None
        return {
            "ready": pdp.policy is not None and len(pdp.certificates.bundles)
            == len(self.config.certificates.trust_bundles) and store.ok and self.revocation_sync.ready
            and (opa is None or opa["ok"]),
            **({"opa": opa} if opa is not None else {}),
            "store": store.as_dict(),
            "policy_version": pdp.policy.latest_version if isinstance(pdp.policy, RemoteEngine)
            else pdp.policy.version,
            "engine": self.config.policy.engine,
            "dry_run": self.config.policy.dry_run,
            "shadow_policy_version": pdp.trial.shadow.version if pdp.trial and pdp.trial.shadow else None,
            "trust_bundles": [b.name for b in pdp.certificates.bundles],
            "issuers": jwks,
            "revocations": self.revocation_sync.status(),
            "identities": self.inventory.count() if self.inventory is not None else None,
        }

    # -- HTTP
    async def check(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/check``, straight on ASGI (``pdp.service.raw_asgi``): every gateway request comes here."""
        client = scope.get("client")
        peer = client[0] if client else ""
        now = time.time()
        # The document is JSON: said so (application/json, any +json type) or not said at all, as OPA's
        # REST API and most clients have it. Another type is refused rather than read as JSON regardless:
        # a browser may send text/plain or a form across origins without asking first.
        declared = [t for t in header_values(scope, b"content-type") if not _is_json(t)]
        if declared:
            decision = self.pdp.refuse(reasons.REQUEST_INVALID, f"content-type {declared[0][:100]!r} is not "
                                       "application/json", _unreadable(now, peer))
            return await _answer_json(send, render(dataclasses.replace(decision, status=415)), 415)
        limit = self.config.server.max_body_bytes
        try:
            body = await read_body(scope, receive, limit)
            doc = json.loads(body)
            raw = parse_request(doc, now=now, peer_address=peer)
        except Disconnected:
            return None
        except BodyTooLarge:
            # 413 (Content Too Large): the reason's own 431 is for request heads, which this is not.
            decision = self.pdp.refuse(reasons.REQUEST_TOO_LARGE, "request document larger than "
                                       f"server.max_body_bytes ({limit})", _unreadable(now, peer))
            return await _answer_json(send, render(dataclasses.replace(decision, status=413)), 413)
        except (ValueError, RecursionError, RequestDocumentError) as exc:
            detail = str(exc) if isinstance(exc, RequestDocumentError) else "the body is not JSON"
            decision = self.pdp.refuse(reasons.REQUEST_INVALID, detail, _unreadable(now, peer))
            return await _answer_json(send, render(decision), 400)
        await answer(send, 200, check_answer(await self._check(raw)), content_type="application/json")

    async def _check(self, raw: RawRequest) -> Decision:
        try:
            # Decisions are CPU work: inline on the event loop, unless one must wait on a JWKS fetch.
            return self.pdp.check(raw, network=False)
        except NeedsNetwork as exc:
            assert exc.request is not None
            return await run_in_threadpool(self.pdp.decide, exc.request)

    async def ext_authz(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Envoy http_service / nginx auth_request / Traefik forwardAuth, straight on ASGI."""
        caller_der = (scope.get("extensions", {}).get("tls") or {}).get("client_cert_der")
        raw = scope_to_raw(scope, via=Via.SUBREQUEST, now=time.time(), caller_names=caller_names(caller_der))
        statuses = "401/403" if self.config.gateway.forwarded_request == "nginx" else "any"
        status, out_headers, body = http_authz.render(await self._check(raw), statuses=statuses)
        await answer(send, status, body, out_headers.items())

    def _untrusted_header(self, header: str, peer: str) -> None:
        self.metrics.untrusted_cert_headers.inc()
        log.warning("ignored a %s header from %s, which is not a trusted proxy", header, peer)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        state = await run_in_threadpool(self.readiness)
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        await run_in_threadpool(self.store_health.state)  # pdp_store_up as of this scrape (at most 1 s old)
        await run_in_threadpool(self.sync_metrics)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    def asgi_app(self) -> Any:
        """The HTTP application as served: the routes, behind the caller gate on a TLS listener (callers
        outside ``allowed_callers``, or whose certificate is on pdp's revocation list, are refused)."""
        tls = self.config.server.tls
        app = DecisionPaths(self.app(), check=self.check, ext_authz=self.ext_authz,
                            prefix=self.config.gateway.ext_authz_prefix)
        return caller_gate(app, tls.allowed_callers, lambda: self.pdp.revocations) if tls is not None else app

    def uvicorn_config(self, host: str, port: int, **options: Any) -> uvicorn.Config:
        """The uvicorn settings for this service's HTTP listener (TLS, the TLS scope extension, the gate)."""
        return uvicorn.Config(self.asgi_app(), host=host, port=port, **uvicorn_options(self.config), **options)

    async def introspection(self, request: Request) -> Response:
        """RFC 7662: authenticate the caller as an introspection client, then answer for the token.
        No answer, refusals included, may be cached (RFC 6749 §5.1)."""
        no_store = {"cache-control": "no-store", "pragma": "no-cache"}

        def refuse(status: int, error: str, **headers: str) -> Response:
            return JSONResponse({"error": error}, status_code=status, headers={**no_store, **headers})

        clients = {c.client_id: c for c in self.config.introspection.clients}
        peer = request.client.host if request.client else ""
        if len(request.headers.getlist("authorization")) > 1:  # which one would be the client's?
            return refuse(400, "invalid_request")
        try:
            client = await run_in_threadpool(introspection.basic_client, request.headers.get("authorization"),
                                             clients, limiter=self.introspection_limiter, source=peer)
            if client is None:
                identity = await run_in_threadpool(self._caller_identity, request, time.time())
                if identity is None:
                    raise introspection.ClientAuthError("no client authentication")
                pinned = any(b.name == identity.trust_bundle and b.trust_domain
                             for b in self.pdp.certificates.bundles)
                client = introspection.certificate_client(identity, clients, pinned=pinned)
        except introspection.LockedOut as exc:
            self.metrics.introspection_auth_failures.labels("locked").inc()
            log.info("introspection refused from %s: %s", peer, exc)
            return refuse(429, "invalid_client", **{"retry-after": str(math.ceil(exc.retry_after))})
        except introspection.ClientAuthError as exc:
            self.metrics.introspection_auth_failures.labels("invalid").inc()
            log.info("introspection refused from %s: %s", peer, exc)
            return refuse(401, "invalid_client", **{"www-authenticate": 'Basic realm="pdp"'})
        except StoreUnavailable as exc:
            log.warning("introspection refused, right or wrong: the attempt cannot be recorded: %s", exc)
            return refuse(503, "temporarily_unavailable")
        if "application/x-www-form-urlencoded" not in request.headers.get("content-type", ""):
            return refuse(400, "invalid_request")
        try:
            form = introspection.read_form(await _read_body(request, 64 * 1024))
        except (_TooLarge, ValueError):
            return refuse(400, "invalid_request")
        if not form.get("token"):
            return refuse(400, "invalid_request")
        answer = await run_in_threadpool(introspection.introspect, self.pdp, form["token"], client,
                                         leeway=self.config.introspection.leeway)
        log.info("introspection by %s: active=%s", client.client_id, answer["active"])
        return JSONResponse(answer, headers=no_store)

    def _caller_identity(self, request: Request, now: float) -> CertIdentity | None:
        """The caller's verified certificate: from pdp's mutual-TLS listener or a trusted proxy's header,
        read by the one reader, as on every other entry point, and refused when it is on pdp's own
        revocation list (by thumbprint or SPIFFE ID), as every decision refuses it."""
        tls = request.scope.get("extensions", {}).get("tls") or {}
        raw = scope_to_raw(request.scope, via=Via.DIRECT, now=now, caller_names=caller_names(
            tls.get("client_cert_der")))
        try:
            read = self.pdp.reader.read(raw)
            if read.client_cert_error is not None:
                raise Denied(reasons.CERT_MALFORMED, read.client_cert_error)
            if not read.client_cert_chain:
                return None
            identity = self.pdp.certificates.verify(read.client_cert_chain, now)
            self.pdp.revocations.check_identity(identity, now)
            return identity
        except Denied as exc:
            raise introspection.ClientAuthError(f"client certificate refused: {exc.reason.code}") from exc

    async def oauth_metadata(self, request: Request) -> Response:
        cfg = self.config.introspection
        return JSONResponse(introspection.metadata(cfg.issuer, sorted(self.config.dpop.algorithms)))

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self.start()
            try:
                yield
            finally:
                self.stop()

        prefix = self.config.gateway.ext_authz_prefix
        extra: list[Route] = []
        if self.config.introspection.enabled:
            extra = [Route("/oauth2/introspect", self.introspection, methods=["POST"]),
                     Route("/.well-known/oauth-authorization-server", self.oauth_metadata, methods=["GET"])]
        if self.config.server.admin:  # only on a mutual-TLS listener with named callers (the loader checks)
            extra += Admin(self.pdp.store, self.revocation_sync, self.config.server.tls,
                           self.config.server.admin_callers).routes()
        return Starlette(
            routes=[
                *extra,
                Route(prefix, _Asgi(self.ext_authz)),
                Route(prefix + "/{rest:path}", _Asgi(self.ext_authz)),
                Route("/v1/check", _Asgi(self.check), methods=["POST"]),
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/readyz", self.readyz, methods=["GET"]),
                Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            ],
            lifespan=lifespan,
        )


def bind_http(address: str) -> socket.socket:
    """The HTTP listener's socket for ``address`` (HOST:PORT), bound and listening as uvicorn would bind
    it, for ``uvicorn.Server.run(sockets=...)``: a taken address is a ``ListenError`` here, before the
    service announces anything, and connections made while the rest starts wait in the backlog."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ListenError.of("HTTP", address, [exc]) from None
    return sock


def _listing(path: Path) -> Callable[[], list[Path]]:
    return lambda: [path]


def uvicorn_options(config: Config) -> dict[str, Any]:
    """uvicorn settings every pdp HTTP listener uses. proxy_headers is off: trusted-proxy decisions are
    made on the transport peer, which an X-Forwarded-For header from a local caller must not rewrite."""
    # h11 refuses a request head past its buffer with a bare 400 (16 KiB by default, depending on how
    # the bytes arrive): let through every head pdp's own limits judge, so the caller gets their reason.
    head = config.decision.max_header_bytes + config.decision.max_path_bytes + 16 * 1024
    options: dict[str, Any] = {"access_log": False, "lifespan": "on", "proxy_headers": False,
                               "h11_max_incomplete_event_size": head, "http": CoalescingH11Protocol}
    if config.server.tls is not None:
        options.update(uvicorn_ssl_options(config.server.tls), **tls_protocols())
    return options


WORKER_CONFIG_ENV = "PDP_WORKER_CONFIG"


def worker_app() -> Any:
    """The app of one ``pdp serve --workers N`` process: its own Service (and gRPC listener, sharing
    the port with SO_REUSEPORT), built from the config the parent handed over in the environment, with
    the state the workers must share: the DPoP nonce secret and, without ``store.url``, the store.

    A worker outlives no parent: once the parent is gone (killed without a chance to stop its workers),
    the worker stops too, rather than serve on unsupervised."""
    import signal

    from pdp.config import load_config
    from pdp.store import LOCKOUT_TABLE, SHARED_TABLE, UnavailableStore

    spec = json.loads(os.environ[WORKER_CONFIG_ENV])
    setup_logging(spec["log_level"])
    config = load_config(Path(spec["config"])) if spec["config"] else Config.defaults()
    server = dataclasses.replace(config.server, http=spec["http"], grpc=spec["grpc"], grpc_reuse_port=True)
    # One nonce secret for all workers, drawn by the parent unless configured: a DPoP nonce issued by one
    # worker is good at every other. Without store.url, the parent's SQLite file is the shared store: the
    # very file the parent made (never a new one, should it be gone), with the DPoP replay state and the
    # lock-out counters in tables of their own, so neither can fill the other's; the introspection answers
    # shared there are authenticated with the store secret the parent handed over (drawn unless configured).
    dpop = dataclasses.replace(config.dpop, nonce_secret=bytes.fromhex(spec["nonce_secret"]))
    if spec.get("store_secret"):
        config = dataclasses.replace(config, store=dataclasses.replace(
            config.store, secret=bytes.fromhex(spec["store_secret"])))
    store: Store | None = None
    lockout_store: Store | None = None
    if spec.get("store"):
        path, identity = Path(spec["store"]), spec["store_identity"]
        try:
            store = SqliteStore(path, table=SHARED_TABLE, create=False, identity=identity)
            lockout_store = SqliteStore(path, table=LOCKOUT_TABLE, create=False, identity=identity,
                                        max_entries=config.introspection.lockout.max_tracked)
        except StoreUnavailable as exc:
            log.error("the workers' shared store cannot be opened; what needs it is denied: %s", exc)
            store = lockout_store = UnavailableStore(str(exc))
    service = Service(dataclasses.replace(config, server=server, dpop=dpop), store=store)
    if lockout_store is not None:
        service.introspection_limiter = service.introspection_limiter.with_store(lockout_store)

    parent = int(spec.get("parent_pid") or 0)

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("the pdp serve process %d is gone: this worker stops", parent)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful stop: open requests are answered
        time.sleep(30.0)
        os._exit(1)

    if parent:
        threading.Thread(target=watch_parent, name="pdp-parent-watch", daemon=True).start()
    return service.asgi_app()


class _Asgi:
    """An ASGI endpoint as a route's app: every method as received (an auth sub-request carries the
    original request's method, ``PROPFIND`` or ``get``, which the one reader judges; the router must not
    answer 405 first), and the endpoint reads the scope itself."""

    def __init__(self, endpoint: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._endpoint = endpoint

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._endpoint(scope, receive, send)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _answer_json(send: Send, content: Any, status: int) -> None:
    await answer(send, status, document(content), content_type="application/json")


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge
    return bytes(body)


def _unreadable(now: float, peer: str) -> CheckRequest:
    return CheckRequest(method="", path="", time=now, source_address=peer)
