"""``Pdp.decide()``: one request in, one decision out, in five visible steps.

1. identity    the client certificate chain → a verified ``CertIdentity``, not on pdp's revocation list
2. credential  the ``Authorization: Bearer`` token → a ``VerifiedToken``, not on pdp's revocation list
3. binding     RFC 8705: the token's ``cnf.x5t#S256`` against the certificate
4. policy      the Rego policy on the request plus all of the above
5. decision    allow/deny, status, headers, challenge, explanation

A presented credential that fails a check ends the pipeline with a deny (the
policy never sees it, so no policy can allow it). A missing credential is the
policy's question. Any unexpected error is a deny with ``internal_error``:
``decide()`` does not raise.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdp import reasons
from pdp.allowed import KEPT as ALLOWED_KEPT
from pdp.allowed import AllowedParts, client_pdp_headers, facts_metadata, header_value
from pdp.certificates.identity import CertIdentity
from pdp.certificates.inventory import InventoryRecorder
from pdp.certificates.revocation_list import RevocationList
from pdp.certificates.trust import ChainVerifier
from pdp.credentials.rfc6750 import challenge
from pdp.credentials.rfc8705 import BINDING_METHOD, check_binding
from pdp.credentials.rfc9449 import DpopSettings, NonceIssuer, check_proof, request_uri
from pdp.credentials.tokens import TokenVerifier, VerifiedToken
from pdp.decision import Decision, Step, new_decision_id
from pdp.errors import Denied, NeedsNetwork
from pdp.policy.engine import PolicyEngine, PolicyEvalError
from pdp.policy.grpc_body import GrpcMessages
from pdp.policy.input import build_input
from pdp.policy.result import PolicyOutcome, PolicyResultError, decided_outcome
from pdp.policy.shadow import Trial
from pdp.reasons import Reason
from pdp.request import CheckRequest
from pdp.request_reader import RawRequest, RequestReader
from pdp.service.decision_log import DecisionLog
from pdp.store import MemoryStore, Store, on_the_network

log = logging.getLogger("pdp")

_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                   r"[A-Za-z0-9])?)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
# Only the scheme is case-insensitive: under re.IGNORECASE the token68 class would also match non-ASCII
# letters that fold to ASCII ('\u212a', the Kelvin sign, for 'k'), and it costs 5x the time on a long token.
_CREDENTIAL = re.compile(r"(?i:Bearer|DPoP) +([A-Za-z0-9\-._~+/]+=*)")
# A path the upstream may read differently from the policy: dot segments, empty segments,
# backslashes, control characters, ';' path parameters (some servers strip them: '/admin;/x'),
# and percent-encoded unreserved characters, slashes, backslashes or semicolons.
# Percent-encoded control characters and byte sequences no UTF-8 decoder may accept (overlong forms
# such as '%C0%AE' for '.', which lenient decoders still turn into a dot) are refused too.
_AMBIGUOUS_PATH = re.compile(
    r"//|/\.\.?(?:/|$)|\\|;|[\x00-\x20\x7f]"
    r"|%(?:2[dDeEfF]|3[0-9bB]|[46][1-9a-fA-F]|[57][0-9aA]|5[cCfF]|7[eE])"
    r"|%(?:[01][0-9a-fA-F]|7[fF]|[cC][01]|[fF][5-9a-fA-F])|%[eE]0%[89][0-9a-fA-F]|%[fF]0%8[0-9a-fA-F]")


@dataclass(frozen=True, slots=True)
class UpstreamHeaders:
    """Names of the headers pdp adds to an allowed request ("" leaves one out)."""

    spiffe_id: str = "x-pdp-spiffe-id"
    subject: str = "x-pdp-subject"
    client_id: str = "x-pdp-client-id"
    cert_thumbprint: str = "x-pdp-cert-thumbprint"
    decision_id: str = "x-pdp-decision-id"

    def names(self) -> tuple[str, ...]:
        return _names(self)


@dataclass(frozen=True, slots=True)
class DecisionSettings:
    realm: str = "pdp"
    require_bound_tokens: bool = False
    remove_authorization: bool = True
    upstream: UpstreamHeaders = field(default_factory=UpstreamHeaders)
    max_header_bytes: int = 64 * 1024
    max_headers: int = 200
    max_path_bytes: int = 8 * 1024


DecisionSink = Callable[[Decision, float], None]
_ALLOW_STEP = Step("decision", True, "allow")


class _Trace:
    __slots__ = ("dpop", "identity", "raw_token", "reviewed", "steps", "token")

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.identity: CertIdentity | None = None
        self.token: VerifiedToken | None = None
        self.raw_token = ""
        self.dpop = False  # the request used the DPoP authorization scheme
        self.reviewed: PolicyOutcome | None = None  # the policy's outcome as the trial saw it (``Pdp.trial``)

    def ok(self, name: str, detail: str) -> None:
        self.steps.append(Step(name, True, detail))


class Pdp:
    """The decision point. Build it once (``pdp.config.build_pdp``); call ``decide()`` from any thread."""

    #: A shadow policy, dry run or recorded inputs (``pdp.policy.shadow``); None when all are off.
    trial: Trial | None = None
    #: The gRPC messages bodies are read as (``policy.proto_descriptor``); None: gRPC bodies are not read.
    grpc_messages: GrpcMessages | None = None

    def __init__(self, *, certificates: ChainVerifier, tokens: TokenVerifier, policy: PolicyEngine,
                 settings: DecisionSettings | None = None, decision_log: DecisionLog | None = None,
                 sinks: tuple[DecisionSink, ...] = (), dpop: DpopSettings | None = None,
                 store: Store | None = None, closers: tuple[Callable[[], None], ...] = (),
                 reader: RequestReader | None = None, revocations: RevocationList | None = None,
                 inventory: InventoryRecorder | None = None) -> None:
        self.certificates = certificates
        self.tokens = tokens
        self.policy = policy
        self.settings = settings or DecisionSettings()
        self.dpop = dpop or DpopSettings()
        self.store: Store = store or MemoryStore()
        self.nonces = NonceIssuer(self.dpop.nonce_secret, self.dpop.nonce_lifetime)
        self.decision_log = decision_log or DecisionLog()
        self.sinks = sinks
        self.reader = reader or RequestReader()
        #: pdp's own revocation list (this replica's copy; ``pdp.service.revocation_sync`` keeps it current).
        self.revocations = revocations if revocations is not None else RevocationList()
        #: Where verified client identities are queued for the inventory, if it is kept.
        self.inventory = inventory
        self._closers = closers
        #: An allow's parts by the ids of the facts they were made for (``pdp.allowed``).
        self._allowed: dict[tuple[int, int, int, tuple[str, ...]], AllowedParts] = {}

    def close(self) -> None:
        """Release what this decision point opened (HTTP clients for key sets and introspection)."""
        for close in self._closers:
            close()
        self.policy.close()  # the policy in force now: a reload may have replaced the one built with

    def decide(self, request: CheckRequest, *, network: bool = True) -> Decision:
        """Decide on ``request``. Never raises, except ``NeedsNetwork`` when ``network`` is False
        and the decision would have to wait for an issuer's key set to be fetched."""
        started = time.perf_counter()
        decision_id = new_decision_id()
        trace = _Trace()
        policy = self.policy  # one policy version for the whole decision, even during a reload
        try:
            if not network and policy.needs_network:
                # A remote policy engine is a network wait on every decision: defer before any step, so
                # that a DPoP proof is checked (and its jti recorded) once, by the decision that waits.
                raise NeedsNetwork("policy")
            self._check_request(request)
            trace.identity = self._identity(request, trace, network)
            trace.token = self._credential(request, trace, network)
            binding = self._binding(request, trace, network)
            outcome = self._policy(policy, request, trace, binding)
            decision = self._decision(decision_id, request, outcome, trace)
        except NeedsNetwork:
            raise
        except Denied as denied:
            trace.steps.append(Step(_step_of(denied.reason), False, f"{denied.reason.code}: {denied.detail}"))
            decision = self._deny(decision_id, denied.reason, denied.detail, trace)
        except Exception as exc:  # fail closed, whatever went wrong
            log.exception("decision %s failed", decision_id)
            trace.steps.append(Step("internal", False, type(exc).__name__))
            decision = self._deny(decision_id, reasons.INTERNAL_ERROR, "internal error; denied", trace)
        self._record(decision, request, trace, policy.version, time.perf_counter() - started)
        return decision

    def check(self, raw: RawRequest, *, network: bool = True) -> Decision:
        """Read what an entry point received (``RequestReader``, the one reading) and decide on it.
        A request that cannot be read is a deny (``request_invalid``). Raises only ``NeedsNetwork``
        (with the request as read) when ``network`` is False and a key set must be fetched."""
        try:
            request = self.reader.read(raw)
        except Denied as denied:
            return self.refuse(denied.reason, denied.detail, CheckRequest(
                method=raw.method[:32], path=raw.target.split("?", 1)[0][:512], time=raw.time,
                source_address=raw.source_address or raw.peer_address))
        try:
            return self.decide(request, network=network)
        except NeedsNetwork as exc:
            exc.request = request
            raise

    def refuse(self, reason: Reason, detail: str, request: CheckRequest) -> Decision:
        """A deny for a request an adapter could not even read (logged and counted like any other)."""
        started = time.perf_counter()
        trace = _Trace()
        trace.steps.append(Step("request", False, f"{reason.code}: {detail}"))
        decision = self._deny(new_decision_id(), reason, detail, trace)
        self._record(decision, request, trace, self.policy.version, time.perf_counter() - started)
        return decision

    def _record(self, decision: Decision, request: CheckRequest, trace: _Trace, policy_version: str,
                duration: float) -> None:
        try:
            # The trial (shadow, dry run, recorded input) sees the decision actually made; what it adds to
            # this decision's line travels with the decision, never kept anywhere for later.
            members = self.trial.decided(decision, request, trace.reviewed) \
                if self.trial is not None and trace.reviewed is not None else ""
            if self.decision_log.enabled:
                self.decision_log.write(decision, request, trace.identity, trace.token, policy_version, duration,
                                        members)
            for sink in self.sinks:
                sink(decision, duration)
        except Exception:
            log.exception("recording decision %s failed", decision.decision_id)

    # -- 0. the request itself
    def _check_request(self, request: CheckRequest) -> None:
        s = self.settings
        headers = request.headers
        text = "".join((*headers.keys(), *headers.values()))  # every header text, to judge them at once
        _check_text(request, text)
        if len(headers) > s.max_headers:
            raise Denied(reasons.REQUEST_TOO_LARGE, f"{len(headers)} headers (at most {s.max_headers})")
        size = len(text)  # a character is at most 4 bytes of UTF-8: only past a quarter, count bytes
        if size * 4 > s.max_header_bytes and not text.isascii():
            size = _byte_length(text)
        if size > s.max_header_bytes:
            raise Denied(reasons.REQUEST_TOO_LARGE, f"{size} bytes of headers (at most {s.max_header_bytes})")
        if len(request.path) > s.max_path_bytes:
            raise Denied(reasons.REQUEST_TOO_LARGE, f"path of {len(request.path)} bytes")
        if not request.method or not request.path.startswith("/"):
            raise Denied(reasons.REQUEST_INVALID, "method or path missing")
        if request.host and (_HOST.fullmatch(request.host) is None or _port(request.host) > 65535):
            # The host names the target URI (DPoP htu is rebuilt from it): only a host and a port.
            raise Denied(reasons.REQUEST_INVALID, "the host is not a host name, address or port")
        if "#" in request.path:
            raise Denied(reasons.REQUEST_INVALID, "a request target has no fragment")
        path = request.path.split("?", 1)[0]
        if _AMBIGUOUS_PATH.search(path):
            # Prefix rules on such a path could be escaped ('/public/../admin'): refuse, never guess.
            raise Denied(reasons.REQUEST_INVALID, "the path is not in normal form (dot or empty segments, "
                                                  "backslashes or needlessly percent-encoded characters)")

    # -- 1. identity
    def _identity(self, request: CheckRequest, trace: _Trace, network: bool) -> CertIdentity | None:
        if request.client_cert_error is not None:
            raise Denied(reasons.CERT_MALFORMED, request.client_cert_error)
        if not request.client_cert_chain:
            trace.ok("identity", "no client certificate")
            return None
        identity = self.certificates.verify(request.client_cert_chain, request.time, network=network)
        if self.inventory is not None:
            self.inventory.seen(identity, request.time)  # revoked or not: a client that tried is a client
        self.revocations.check_identity(identity, request.time)
        trace.ok("identity", f"{identity.spiffe_id or identity.subject} via {identity.trust_bundle} "
                             f"(x5t#S256 {identity.thumbprint})")
        return identity

    # -- 2. credential
    def _credential(self, request: CheckRequest, trace: _Trace, network: bool) -> VerifiedToken | None:
        header = request.headers.get("authorization")
        if header is None:
            trace.ok("credential", "no access token")
            return None
        words = header.split(None, 1)  # any whitespace: 'Bearer\t<token>' is still a Bearer credential
        scheme = words[0].lower() if words else ""
        if scheme not in ("bearer", "dpop"):
            trace.ok("credential", f"authorization scheme {scheme[:16]!r} is not Bearer or DPoP: no access token")
            return None
        trace.dpop = scheme == "dpop"
        match = _CREDENTIAL.fullmatch(header.strip())  # one or more spaces only, RFC 6750 §2.1
        if match is None:
            raise Denied(reasons.TOKEN_MALFORMED, f"the {scheme} credential is not a token68 value")
        trace.raw_token = match.group(1)
        token = self.tokens.verify(trace.raw_token, request.time, network=network)
        self.revocations.check_token(token, request.time)
        trace.ok("credential", f"{token.alg} token of {token.issuer} for {token.claims.get('sub')!r}")
        return token

    # -- 3. binding
    def _binding(self, request: CheckRequest, trace: _Trace, network: bool) -> dict[str, Any]:
        identity, token = trace.identity, trace.token
        if token is None:
            trace.ok("binding", "no token to bind")
            return {"method": None, "bound": False}
        binding: dict[str, Any] | None = None
        if token.x5t_s256 is not None:
            check_binding(token.x5t_s256, identity.thumbprint if identity else None)
            trace.ok("binding", "token bound to the client certificate (RFC 8705 x5t#S256)")
            binding = {"method": BINDING_METHOD, "bound": True}
        if trace.dpop:
            if not network and on_the_network(self.store):
                # The proof's jti goes to a store on another machine: a wait that must not hold an event loop.
                raise NeedsNetwork("store")
            proof = check_proof(
                request.headers.get("dpop"), method=request.method,
                uri=request_uri(request.scheme, request.host, request.path), access_token=trace.raw_token,
                token_jkt=token.jkt, now=request.time, settings=self.dpop, store=self.store, nonces=self.nonces)
            trace.ok("binding", f"token bound to the DPoP key {proof.jkt} (RFC 9449), proof {proof.jti[:16]}")
            return {"method": "dpop", "bound": True, "jkt": proof.jkt}
        if token.jkt is not None:
            # A DPoP-bound token presented as Bearer is a downgrade (RFC 9449 §7.1).
            raise Denied(reasons.BINDING_DPOP_REQUIRED,
                         "the token is DPoP-bound (cnf.jkt) and cannot be used as a Bearer token")
        if binding is not None:
            return binding
        if self.settings.require_bound_tokens:
            raise Denied(reasons.TOKEN_UNBOUND, "the token has no cnf.x5t#S256 and bound tokens are required")
        trace.ok("binding", "token is not bound (allowed by configuration)")
        return {"method": None, "bound": False}

    # -- 4. policy
    def _policy(self, policy: PolicyEngine, request: CheckRequest, trace: _Trace,
                binding: dict[str, Any]) -> PolicyOutcome:
        doc = build_input(request, trace.identity, trace.token, binding, self.grpc_messages)
        try:
            outcome, seen = decided_outcome(policy, doc)
        except (PolicyEvalError, PolicyResultError) as exc:
            raise Denied(reasons.POLICY_ERROR, str(exc)) from exc
        verdict = "allowed" if outcome.allowed else f"denied ({outcome.reason or 'policy_denied'})"
        again = " (the same facts as a decision before)" if seen else ""
        trace.steps.append(Step("policy", outcome.allowed, f"{verdict} by policy {policy.version}{again}"))
        if self.trial is not None:
            outcome = trace.reviewed = self.trial.review(doc, outcome, policy.version, trace.steps)
        return outcome

    # -- 5. decision
    def _decision(self, decision_id: str, request: CheckRequest, outcome: PolicyOutcome, trace: _Trace) -> Decision:
        if outcome.allowed and not request.query_rewritable and (outcome.query_to_set or outcome.query_to_remove):
            # A proxy's auth sub-request can add and remove headers, not change the query string: letting
            # the request through with the query the policy meant to change is not what it allowed.
            raise Denied(reasons.POLICY_ERROR, "the policy changes the query string, which this entry point "
                                               "cannot do")
        if not outcome.allowed:
            reason = reasons.by_code(outcome.reason or "policy_denied")
            if reason.status < 400:  # a deny that names a success ("allowed") is still a deny
                reason = reasons.POLICY_DENIED
            return self._deny(decision_id, reason, reason.description, trace, outcome)
        identity, token = trace.identity, trace.token
        client_pdp = client_pdp_headers(request.headers)
        key = (id(identity), id(token), id(outcome), client_pdp)
        parts = self._allowed.get(key)
        if parts is None or not parts.fits(identity, token, outcome):
            parts = AllowedParts(self.settings, identity, token, outcome, client_pdp)
            if len(self._allowed) >= ALLOWED_KEPT:
                self._allowed.clear()  # a flood of new facts: start again rather than grow
            self._allowed[key] = parts  # it holds what the key's ids name: no id is reused while it is kept
        return Decision(
            decision_id=decision_id, allowed=True, status=200, reason=parts.reason, message="allowed",
            headers=parts.headers(decision_id), headers_to_remove=parts.headers_to_remove,
            response_headers=parts.response_headers, more_headers=parts.more_headers,
            more_response_headers=parts.more_response_headers,
            query_to_set=outcome.query_to_set, query_to_remove=outcome.query_to_remove,
            steps=(*trace.steps, _ALLOW_STEP), metadata=parts.metadata(decision_id),
            identity=identity, token=token, parts=parts,
        )

    def _deny(self, decision_id: str, reason: Reason, detail: str, trace: _Trace,
              outcome: PolicyOutcome | None = None) -> Decision:
        # On a deny the policy's 'headers' go to the client, as opa-envoy-plugin sends them (and pdp adds
        # 'response_headers_to_add', which the plugin reads on an allow only).
        response_headers: dict[str, str] = {}
        more: tuple[tuple[str, str], ...] = ()
        if outcome is not None:
            lines = [*outcome.more_headers, *outcome.more_response_headers]
            for k, v in (*outcome.headers.items(), *outcome.response_headers.items()):
                if k in response_headers and k == "set-cookie":
                    lines.append((k, v))
                else:
                    response_headers[k] = header_value(v)
            more = tuple((k, header_value(v)) for k, v in lines)
        if reason.challenge:
            dpop = reason.dpop or trace.dpop
            response_headers["www-authenticate"] = challenge(
                realm=self.settings.realm, error=reason.oauth_error, description=reason.description,
                scope=outcome.scope if outcome is not None else None,  # the policy's: what the request needs
                scheme="DPoP" if dpop else "Bearer", algs=self.dpop.algs_param if dpop else None)
        if reason is reasons.DPOP_NONCE_REQUIRED:
            response_headers["dpop-nonce"] = self.nonces.issue(time.time())
        code = outcome.reason if outcome and outcome.reason and reasons.by_code(outcome.reason).status >= 400 \
            else reason.code
        status = reason.status
        if outcome and outcome.http_status and outcome.http_status >= 400:  # a deny is never a 2xx/3xx
            status = outcome.http_status
        steps = (*trace.steps, Step("decision", False, f"deny {code}"))
        return Decision(
            decision_id=decision_id, allowed=False, status=status, reason=code,
            message=detail, response_headers=response_headers, more_response_headers=more,
            body=outcome.body if outcome else "",
            steps=steps, reason_info=reason,
            metadata={"decision_id": decision_id, **facts_metadata(code, trace.identity, trace.token, outcome)},
            identity=trace.identity, token=trace.token,
        )


@functools.lru_cache(maxsize=8)
def _names(upstream: UpstreamHeaders) -> tuple[str, ...]:
    return tuple(n for n in (upstream.spiffe_id, upstream.subject, upstream.client_id, upstream.cert_thumbprint,
                             upstream.decision_id) if n)


def _check_text(request: CheckRequest, header_text: str) -> None:
    """Every text of the request must be Unicode: a lone surrogate (a JSON document may hold "\\ud800")
    is no character of any request, and the regorus engine dies converting one. ``header_text`` is
    the request's header names and values, joined."""
    texts = (request.method, request.path, request.host, request.scheme, request.source_address,
             request.protocol, header_text, request.body if isinstance(request.body, str) else "")
    for text in texts:
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise Denied(reasons.REQUEST_INVALID, "the request holds text that is not Unicode") from None


def _port(host: str) -> int:
    """The port of a host that matched ``_HOST`` (0 when it names none)."""
    head, sep, port = host.rpartition(":")
    return int(port) if sep and not head.endswith(":") and port.isdigit() and "]" not in port else 0


def _byte_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _step_of(reason: Reason) -> str:
    code = reason.code
    if code.startswith(("binding_", "dpop_")) or code == reasons.TOKEN_UNBOUND.code:
        return "binding"
    if code.startswith("cert_") or code == reasons.SUBJECT_REVOKED.code:
        return "identity"
    if code.startswith(("token_", "jwks_")):
        return "credential"
    if code.startswith("policy_"):
        return "policy"
    return "request"
