"""``policy.engine = "opa"``: every decision asked of a remote OPA server, through its REST Data API.

pdp builds the same input document as for its embedded engines and reads the answer with the same
reader (``pdp.policy.result``): ``POST {url}/v1/data/{policy.decision}?provenance=true&strict-builtin-errors=true``
with ``{"input": ...}``, through ``opa-python-client`` (``pdp.policy.opa_session`` bounds each exchange).
OPA's answer ``{"result": ...}`` is the policy's value; an answer without ``result`` is OPA's undefined,
which pdp reads as the embedded engines' ``UNDEFINED`` (a deny). ``strict-builtin-errors`` makes a builtin
error an error, as pdp's embedded engines run (never an undefined value a ``default`` could turn into an
allow).

Every failure on the way is a deny with ``policy_unavailable`` (503), never an allow: no connection, no
complete answer within ``policy.opa.timeout``, a status other than 200, a ``Content-Encoding``, an answer
that is not a strict JSON object (RFC 8259, read by ``pdp.credentials.jose.json_object``: no duplicate
member, no NaN, no number out of range, UTF-8 only) or is larger than ``policy.opa.max_answer_bytes``.
All ``policy.opa.max_connections`` connections in use until the deadline is that deny too. A kept
connection the server closed meanwhile is not a failure: the request goes on a new one (once, within the
deadline, and only while nothing of an answer was read: ``pdp.policy.opa_session``). What the
caller is told names no address; the log names the server (a warning when OPA stops answering, one
when it answers again). ``/readyz`` (``health``) wants OPA's ``/health`` to answer and no decision
refused within the last ``policy.opa.unready_after_failure`` seconds.

An https server is asked with the CAs of ``policy.opa.ca`` and, for OPA's ``--authentication=tls``, pdp's
``client_cert`` and ``client_key``: read and checked at start-up (``tls_context``), each failure a
``LoadError`` naming the key and the file.

The policy version of a decision is the revision OPA reports for it (``provenance.revision``, or each
``provenance.bundles.<name>.revision``): the thread that decided reads the revision of its own last
exchange (``unknown`` when it failed); ``latest_version`` is the last one any exchange named, and
``on_revision`` hears of each change. pdp cannot see the remote policy (it may read the time, or data
pdp does not know), so no outcome is kept between decisions: the decision cache is off.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdp import reasons
from pdp.credentials.jose import DecodeError, json_object, unicode_text
from pdp.errors import Denied, LoadError
from pdp.policy.engine import UNDEFINED, PolicyBundle, PolicyEngine, entrypoint_query

if TYPE_CHECKING:
    from pdp.config import OpaConfig, PolicyConfig
    from pdp.policy.opa_session import Exchange

log = logging.getLogger("pdp.policy")

#: The policy version of a decision when OPA named no revision (it loaded no bundle with one).
UNKNOWN_REVISION = "unknown"
#: What ``/readyz`` says of an OPA server that does not answer (the address is in the log).
UNAVAILABLE_TEXT = "the policy engine does not answer"
_QUERY = "provenance=true&strict-builtin-errors=true"
_HEALTH_INTERVAL = 1.0
_REVISION_CHARS = 200


def read_token(opa: OpaConfig) -> str | None:
    """The bearer token for OPA, read from ``token_file``; a ``LoadError`` names the key."""
    if opa.token_file is None:
        return None
    try:
        token = opa.token_file.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadError("policy.opa.token_file", f"cannot read {str(opa.token_file)!r}: {exc}") from exc
    if not token:
        raise LoadError("policy.opa.token_file", f"{str(opa.token_file)!r} is empty")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise LoadError("policy.opa.token_file", f"{str(opa.token_file)!r} holds spaces or characters no HTTP "
                                                 "header may carry")
    return token


def remote_engine(policy: PolicyConfig) -> RemoteEngine:
    """The engine of ``policy.engine = "opa"``; contacts no server yet (OPA may start after pdp)."""
    opa = policy.opa
    if opa is None:
        raise LoadError("policy.opa.url", "is required when policy.engine = \"opa\"")
    tls = tls_context(opa)
    token = read_token(opa)
    if token is not None and opa.url.startswith("http://"):
        log.warning("policy.opa: the bearer token goes to %s over plain http", opa.url)
    return RemoteEngine(opa.url, decision=policy.decision, timeout=opa.timeout, token=token, tls=tls,
                        max_answer_bytes=opa.max_answer_bytes, max_connections=opa.max_connections,
                        unready_after_failure=opa.unready_after_failure)


def tls_context(opa: OpaConfig) -> ssl.SSLContext | None:
    """The TLS context of every connection to an https OPA server (None for http): the CAs of ``ca`` and
    pdp's ``client_cert`` and ``client_key``, each checked here so that a ``LoadError`` names the key and
    the file."""
    from pdp.policy import opa_session

    if not opa.url.startswith("https://"):
        return None
    if opa.ca is not None:
        _pem_certificates("policy.opa.ca", opa.ca)
    try:
        context = opa_session.tls_context(opa.ca)
    except (OSError, ssl.SSLError) as exc:
        raise LoadError("policy.opa.ca", f"{str(opa.ca)!r} does not load: {exc}") from exc
    if opa.client_cert is not None and opa.client_key is not None:
        _load_client_pair(context, opa.client_cert, opa.client_key)
    return context


def _load_client_pair(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """pdp's certificate and key into ``context``, after checking what OpenSSL would report obscurely, or
    not at all: the key on its own first (an encrypted key would make OpenSSL ask for a pass phrase on the
    terminal: pdp takes none), then that it is the certificate's."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    certificate = _pem_certificates("policy.opa.client_cert", cert)[0]
    try:
        data = key.read_bytes()
    except OSError as exc:
        raise LoadError("policy.opa.client_key", f"cannot read {str(key)!r}: {exc.strerror or exc}") from exc
    try:
        private = serialization.load_pem_private_key(data, None)
    except TypeError:
        raise LoadError("policy.opa.client_key", f"{str(key)!r} is an encrypted key: pdp takes no pass phrase "
                                                 "(give it the key unencrypted, readable by pdp alone)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise LoadError("policy.opa.client_key", f"{str(key)!r} holds no PEM private key: {exc}") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise LoadError("policy.opa.client_key", f"{str(key)!r} is not the key of the certificate in "
                                                 f"{str(cert)!r}")
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise LoadError("policy.opa.client_cert", f"{str(cert)!r} with {str(key)!r} does not load: "
                                                  f"{getattr(exc, 'reason', None) or exc}") from exc


def _pem_certificates(key: str, path: Path) -> list[Any]:
    from cryptography import x509

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LoadError(key, f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise LoadError(key, f"{str(path)!r} holds no PEM certificate: {exc}") from None


def revision_of(provenance: Any) -> str | None:
    """The policy revision in OPA's ``provenance``: its ``revision`` (one bundle, legacy configuration), the
    one bundle's revision, or ``name=revision`` of each bundle joined with ','; None when OPA names none."""
    if not isinstance(provenance, dict):
        return None
    revision = provenance.get("revision")
    if not (isinstance(revision, str) and revision):
        bundles = provenance.get("bundles")
        named = sorted((name, b["revision"]) for name, b in bundles.items()
                       if isinstance(b, dict) and isinstance(b.get("revision"), str) and b["revision"]) \
            if isinstance(bundles, dict) else []
        revision = named[0][1] if len(named) == 1 else ",".join(f"{n}={r}" for n, r in named)
    # It goes to logs and explanations: printable text, bounded.
    text = "".join(c for c in revision if c.isprintable())[:_REVISION_CHARS]
    return text or None


class RemoteEngine(PolicyEngine):
    """A ``PolicyEngine`` whose every evaluation is one exchange with an OPA server (on a pooled client)."""

    needs_network = True

    def __init__(self, url: str, *, decision: str, timeout: float = 0.5, token: str | None = None,
                 tls: ssl.SSLContext | None = None, max_answer_bytes: int = 1024 * 1024, max_connections: int = 16,
                 unready_after_failure: float = 5.0) -> None:
        # No super().__init__(): there is nothing to compile here. The HTTP client is imported now, at
        # start-up, rather than by the first decision.
        from pdp.policy.opa_session import ClientPool, new_client, tls_context

        if tls is None and url.startswith("https://"):
            tls = tls_context()  # once: every connection shares it

        self.url = url
        entrypoint = entrypoint_query(decision)
        self.bundle = PolicyBundle((), {}, entrypoint, engine="opa")
        self.decisions = None
        self.timeout = timeout
        self.max_answer_bytes = max_answer_bytes
        self.unready_after_failure = unready_after_failure
        self._path = entrypoint.removeprefix("data").strip(".").replace(".", "/")
        self._local = threading.local()
        self._pool = ClientPool(lambda: new_client(url, timeout=timeout, token=token, tls=tls), max_connections)
        self._root = f"{url}/v1"
        #: Called with each revision OPA names that differs from the last one (``pdp_policy_info``).
        self.on_revision: Callable[[str], None] | None = None
        self._revision: str | None = None
        self._revision_lock = threading.Lock()
        self._answering: bool | None = None  # for the log: None until the first exchange or probe
        self._probe_ok: bool | None = None  # None until the first probe
        self._refused: tuple[float, str] | None = None  # when and why the last decision's answer was refused
        self._probe_lock = threading.Lock()
        self._next_probe = float("-inf")
        self._closer = weakref.finalize(self, self._pool.close)

    @property
    def version(self) -> str:
        """The revision OPA named for this thread's last decision, else ``unknown`` (also after a failure:
        a decision OPA did not answer is never logged with another decision's revision)."""
        return getattr(self._local, "revision", None) or UNKNOWN_REVISION

    @version.setter
    def version(self, value: str) -> None:
        raise AttributeError("a remote engine's version is the revision OPA reports")

    @property
    def revision(self) -> str | None:
        """The revision OPA named in its last answer to any thread, if any."""
        return self._revision

    @property
    def latest_version(self) -> str:
        """The engine-wide policy version (``/readyz``): the last revision OPA named, else ``unknown``."""
        return self._revision or UNKNOWN_REVISION

    def close(self) -> None:
        """Close the idle connections; those in use close when their exchange ends."""
        self._pool.close()

    def evaluate(self, input_doc: dict[str, Any]) -> Any:
        return self._ask(self._path, input_doc)

    def query(self, ref: str, input_doc: dict[str, Any] | None = None) -> Any:
        return self._ask(entrypoint_query(ref).removeprefix("data").strip(".").replace(".", "/"), input_doc or {})

    def _ask(self, path: str, input_doc: dict[str, Any]) -> Any:
        from pdp.policy.opa_session import bounded, send

        self._local.revision = None
        answer: Any = None
        exchange: Exchange | None = None
        refused = True  # the server answered, and pdp could not use the answer
        read = False  # the answer was read to its end: the connection may serve the next exchange
        client = None
        try:
            with bounded(self.timeout, self.max_answer_bytes) as exchange:
                client = self._pool.take(exchange.deadline)  # waiting for a connection spends the deadline too
                status, body = send(client, "POST", f"{self._root}/data/{path}?{_QUERY}", {"input": input_doc})
            read = True
            if status != 200:
                failure: str | None = f"answered HTTP {status}"
            else:
                answer = json_object(body)
                failure = None if unicode_text(answer) else "answered with JSON that is not a decision document"
        except DecodeError as exc:
            failure = _not_json(str(exc))
        except Exception as exc:  # whatever failed, the decision is a deny
            failure = _failure(exc, exchange, self.timeout)
            refused = failure.startswith(("answered", "sent"))
            log.debug("policy.opa: %s: %r", self.url, exc)
        finally:
            if client is not None:
                self._pool.give(client, reusable=read)
        if failure is not None:
            if refused:
                self._refused = (time.monotonic(), f"the policy engine {failure} to the last decision")
            self._answered(False, failure)
            raise Denied(reasons.POLICY_UNAVAILABLE, f"the policy engine {failure}")
        self._refused = None
        self._answered(True, "")
        revision = revision_of(answer.get("provenance"))
        self._local.revision = revision
        if revision is not None and revision != self._revision:
            self._revised(revision)
        return answer["result"] if "result" in answer else UNDEFINED

    def _revised(self, revision: str) -> None:
        with self._revision_lock:  # one call of on_revision per change, in the order they were seen
            if revision == self._revision:
                return
            self._revision = revision
            if self.on_revision is not None:
                self.on_revision(revision)

    def _answered(self, ok: bool, failure: str) -> None:
        was, self._answering = self._answering, ok
        if not ok and was is not False:
            log.warning("policy.opa: the OPA server at %s %s: requests are denied (policy_unavailable)",
                        self.url, failure)
        elif ok and was is False:
            log.warning("policy.opa: the OPA server at %s answers again", self.url)

    def health(self) -> dict[str, Any]:
        """For ``/readyz``: ``ok`` when OPA answers ``GET /health?bundles=true`` (asked at most once a second,
        one probe at a time: a caller that arrives during a probe is told the last result) and no decision
        within the last ``unready_after_failure`` seconds was answered with something pdp refused (a status other
        than 200, an answer that is no decision document): OPA may be healthy and deny every decision
        (no bundle at the decision's path, a token it refuses). Also the last revision OPA named, and
        ``last_decision_error``, the last decision's failure when its answer was refused, else null."""
        now = time.monotonic()
        if now >= self._next_probe and self._probe_lock.acquire(blocking=self._probe_ok is None):
            try:
                if now >= self._next_probe:
                    self._probe()
                    self._next_probe = time.monotonic() + _HEALTH_INTERVAL
            finally:
                self._probe_lock.release()
        refused = self._refused
        recent = refused is not None and time.monotonic() - refused[0] < self.unready_after_failure
        ok = bool(self._probe_ok) and not recent
        out: dict[str, Any] = {"ok": ok, "revision": self._revision,
                               "last_decision_error": refused[1] if refused is not None else None}
        if not self._probe_ok:
            out["error"] = UNAVAILABLE_TEXT
        elif refused is not None and recent:
            out["error"] = refused[1]
        return out

    def _probe(self) -> None:
        from pdp.policy.opa_session import bounded, send

        client = None
        ok = False
        try:
            with bounded(self.timeout, 64 * 1024) as exchange:
                client = self._pool.take(exchange.deadline)
                ok = send(client, "GET", f"{self.url}/health?bundles=true")[0] == 200
        except Exception:
            ok = False
        finally:
            if client is not None:
                self._pool.give(client, reusable=ok)
        self._probe_ok = ok
        self._answered(ok, "does not answer GET /health" if not ok else "")


def _not_json(error: str) -> str:
    """``json_object``'s refusal in fixed words (its own may quote the answer)."""
    if error.startswith("duplicate member"):
        return "answered with JSON holding a duplicate member"
    if error.endswith(("is not JSON", "is out of range")):
        return "answered with JSON holding a number that is not finite"
    if error == "not UTF-8":
        return "answered with text that is not UTF-8"
    if error == "not a JSON object" or "surrogate" in error:
        return "answered with JSON that is not a decision document"
    return "answered with something that is not JSON"


def _failure(exc: BaseException, exchange: Exchange | None, timeout: float) -> str:
    """What went wrong, in words that name no address (they reach the caller in the explanation)."""
    import http.client

    import requests
    import urllib3

    from pdp.policy.opa_session import EncodedAnswer, NoFreeConnection

    if isinstance(exc, NoFreeConnection):
        return f"was busy: no connection free within {timeout:g} s (policy.opa.max_connections)"
    if exchange is not None and exchange.too_large:
        return f"answered with more than {exchange.max_bytes} bytes"
    if (exchange is not None and exchange.timed_out) or isinstance(exc, requests.Timeout):
        return f"did not answer within {timeout:g} s"
    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return f"answered HTTP {status}"
    if isinstance(exc, requests.TooManyRedirects):
        return "answered with a redirect"
    if isinstance(exc, requests.exceptions.SSLError):
        return "failed the TLS handshake"
    if isinstance(exc, requests.ConnectionError):
        return "cannot be reached"
    if isinstance(exc, EncodedAnswer):
        return "answered with a Content-Encoding other than identity"
    if isinstance(exc, urllib3.exceptions.HTTPError | http.client.HTTPException):
        return "broke off its answer"
    if isinstance(exc, ValueError | RecursionError):
        return "answered with something that is not JSON"
    return f"failed ({type(exc).__name__})"
