"""A bounded soak of a real ``pdp serve``: both transports, a realistic mix, memory and descriptors watched.

``tests/test_soak.py`` runs it for ``PDP_SOAK_SECONDS`` (a short default for CI). The server is the
``pdp`` command on a ``pdp dev init`` folder, with its caches made small so that they fill during the
warm-up; from then on its resident memory must stay flat and its open descriptors must not grow.

The traffic is what a gateway forwards: returning clients whose tokens rotate, new clients (fresh
certificates under the dev CA, each with its own bound token), DPoP clients with a fresh proof each
time and a few replays, and the usual denies (another client's certificate, no token, an expired token,
a SPIFFE ID the routes do not list, a missing scope, an untrusted CA) beside public paths. Every answer
must be the one its kind calls for. Certificates and tokens are made before the clock starts, so the
loop measures pdp, not the minting; only DPoP proofs are signed on the way, since they must be fresh.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from cryptography import x509
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2

from pdp.devinit import AUDIENCE, CLIENT_ID, ISSUER
from pdp.devpki import DpopKey, Issued, TokenIssuer, load_private_key, make_ca, make_client

PDP = str(Path(sys.executable).parent / "pdp")
HOST = "api.example.org"
#: Every cache pdp keeps is sized this small, so that the warm-up fills it and the soak runs on full caches.
CACHE_SIZE = 256
#: A proof's iat may be this far off (seconds): its replay entry lives 2 windows + a margin, so the
#: replay store reaches its steady size early in a long run yet tolerates a stalled client.
DPOP_IAT_WINDOW = 10
TIMEOUT = 15.0
#: Growth of resident memory allowed after the warm-up: a share of it, plus a few MiB for what settles late
#: (allocator arenas, the decision log's bounded encodings of recent certificates and tokens).
RSS_GROWTH_SHARE, RSS_GROWTH_KIB = 0.10, 8 * 1024
#: Open descriptors allowed beyond the reference: connections come and go while the load runs.
FD_SLACK_LOADED, FD_SLACK_IDLE = 8, 4
#: Threads allowed beyond those after the warm-up (gRPC's own event engine sizes its pool as it likes).
THREAD_SLACK = 4
#: Callers per transport, and how many requests each sends on one connection before it opens a new one.
THREADS, RECONNECT = {"grpc": 2, "http": 2}, {"grpc": 400, "http": 200}
#: Failures after which the soak stops early: the samples say enough.
MAX_FAILURES, KEPT_SAMPLES = 200, 8

#: What each kind of request must get: (allowed, reason code).
EXPECTED: dict[str, tuple[bool, str]] = {
    "allow_returning": (True, "allowed"),          # a returning client, its token rotating
    "allow_new": (True, "allowed"),                # a client never seen before, with its bound token
    "allow_dpop": (True, "allowed"),               # RFC 9449: a DPoP-bound token with a fresh proof
    "public": (True, "public_path"),               # no credentials on a public path
    "binding_mismatch": (False, "binding_mismatch"),      # a token shown with another client's certificate
    "token_required": (False, "token_required"),          # a certificate and no token
    "token_expired": (False, "token_expired"),
    "spiffe_id_denied": (False, "spiffe_id_denied"),      # a SPIFFE ID the routes do not list
    "insufficient_scope": (False, "insufficient_scope"),  # a read-only token that writes
    "cert_untrusted": (False, "cert_untrusted"),          # a certificate from a CA pdp does not trust
    "dpop_replay": (False, "dpop_proof_invalid"),         # a DPoP proof sent a second time
}

#: How often each kind is picked (a DPoP replay follows the fresh request whose proof it repeats).
WEIGHTS: dict[str, int] = {
    "allow_returning": 34, "allow_new": 14, "allow_dpop": 8, "public": 5, "binding_mismatch": 8,
    "token_required": 7, "token_expired": 5, "spiffe_id_denied": 5, "insufficient_scope": 5, "cert_untrusted": 3,
    "dpop_replay": 4,
}


# -- the clients, made before the clock starts

@dataclass(frozen=True)
class Client:
    """A client certificate in each form a caller hands it to pdp."""

    issued: Issued
    pem: str                 # /v1/check: the PEM
    quoted: str              # gRPC: the URL-encoded PEM, as Envoy's include_peer_certificate sends it
    client_cert: str         # HTTP ext_authz: RFC 9440 Client-Cert from the trusted proxy

    @classmethod
    def of(cls, issued: Issued) -> Client:
        pem = issued.pem.decode()
        return cls(issued, pem, urllib.parse.quote(pem, safe=""),
                   f":{base64.b64encode(issued.der).decode()}:")


@dataclass(frozen=True)
class Material:
    """Certificates and tokens for every kind of request, minted up front."""

    returning: tuple[tuple[Client, tuple[str, ...]], ...]   # returning clients, each with its rotating tokens
    new: tuple[tuple[Client, str], ...]                     # new clients with their bound tokens
    other: tuple[Client, str]                               # a SPIFFE ID no route lists, with its own token
    read_only: tuple[str, ...]                              # read-only tokens of returning client 0
    expired: tuple[str, ...]                                # expired tokens of returning client 0
    foreign: tuple[tuple[Client, str], ...]                 # certificates of an untrusted CA, bound tokens
    dpop: tuple[tuple[DpopKey, str], ...]                   # DPoP keys with their tokens
    next_new: Callable[[], int] = field(default_factory=lambda: itertools.count().__next__)

    def new_client(self) -> tuple[Client, str]:
        """The next new client (after the last one, the first again: by then its entries are evicted)."""
        return self.new[self.next_new() % len(self.new)]


def _load(folder: Path, name: str) -> Issued:
    return Issued(x509.load_pem_x509_certificate((folder / f"{name}.pem").read_bytes()),
                  load_private_key((folder / f"{name}.key").read_bytes()))


def mint(folder: Path, *, seconds: float, new_clients: int) -> Material:
    """Certificates under the dev CA in ``folder`` and tokens of its issuer, valid beyond the soak."""
    ca = _load(folder, "ca")
    kid = json.loads((folder / "jwks.json").read_text())["keys"][0]["kid"]
    issuer = TokenIssuer(ISSUER, load_private_key((folder / "issuer.key").read_bytes()), kid)
    lifetime = int(seconds) + 3600

    def token(client: Client | None, scope: str = "read write", **kw: Any) -> str:
        kw.setdefault("lifetime", lifetime)
        return issuer.mint(audience=AUDIENCE, subject=f"user-{random.randrange(10**6)}", scope=scope,
                           bound_to=client.issued if client else None, **kw)

    first = Client.of(_load(folder, "client"))
    returning = [first] + [Client.of(make_client(ca, spiffe_id=CLIENT_ID)) for _ in range(3)]
    new = []
    for i in range(new_clients):
        # Half are new workloads (a SPIFFE ID never seen), half a known workload's renewed certificate.
        spiffe_id = f"spiffe://example.org/admin/soak-{i}" if i % 2 else CLIENT_ID
        client = Client.of(make_client(ca, spiffe_id=spiffe_id, common_name=f"soak {i}"))
        new.append((client, token(client)))
    stranger_ca = make_ca("not trusted")
    foreign = [Client.of(make_client(stranger_ca, spiffe_id=CLIENT_ID)) for _ in range(4)]
    other = Client.of(_load(folder, "other"))  # spiffe://example.org/demo/other
    dpop = []
    for _ in range(8):
        key = DpopKey.generate()
        dpop.append((key, token(None, dpop_key=key)))
    return Material(
        returning=tuple((c, tuple(token(c) for _ in range(6))) for c in returning),
        new=tuple(new), other=(other, token(other)),
        read_only=tuple(token(first, scope="read") for _ in range(4)),
        expired=tuple(token(first, now=time.time() - 7200, lifetime=600) for _ in range(4)),
        foreign=tuple((c, token(c)) for c in foreign), dpop=tuple(dpop))


# -- requests

@dataclass(frozen=True)
class Ask:
    """One question to pdp, independent of the transport that carries it."""

    kind: str
    method: str
    path: str
    client: Client | None = None
    authorization: str | None = None
    dpop: str | None = None
    new_client: bool = False          # the first request of a new client


class Plan:
    """Picks the next requests of one caller thread, from its own seeded random sequence."""

    def __init__(self, material: Material, rng: random.Random) -> None:
        self.m, self.rng = material, rng
        self.kinds, self.weights = list(WEIGHTS), list(WEIGHTS.values())
        self.sent = 0

    def _path(self) -> str:
        r = self.rng.random()
        return "/orders" if r < 0.5 else f"/orders/{self.rng.randrange(100_000)}" if r < 0.8 else \
            f"/orders?page={self.rng.randrange(50)}"

    def next(self) -> list[Ask]:
        m, rng = self.m, self.rng
        kind = rng.choices(self.kinds, self.weights)[0]
        self.sent += 1
        client, tokens = m.returning[rng.randrange(len(m.returning))]
        rotating = tokens[(self.sent // 40) % len(tokens)]   # a returning client renews its token now and then
        path = self._path()
        if kind == "allow_returning":
            return [Ask(kind, rng.choice(("GET", "GET", "POST")), path, client, f"Bearer {rotating}")]
        if kind == "allow_new":
            new, token = m.new_client()
            return [Ask(kind, "GET", path, new, f"Bearer {token}", new_client=True)]
        if kind == "binding_mismatch":
            new, _ = m.new_client()
            return [Ask(kind, "GET", path, new, f"Bearer {rotating}", new_client=True)]
        if kind == "token_required":
            return [Ask(kind, "GET", path, client)]
        if kind == "token_expired":
            return [Ask(kind, "GET", path, m.returning[0][0], f"Bearer {rng.choice(m.expired)}")]
        if kind == "spiffe_id_denied":
            return [Ask(kind, "GET", path, m.other[0], f"Bearer {m.other[1]}")]
        if kind == "insufficient_scope":
            return [Ask(kind, "POST", "/orders", m.returning[0][0], f"Bearer {rng.choice(m.read_only)}")]
        if kind == "cert_untrusted":
            foreign, token = rng.choice(m.foreign)
            return [Ask(kind, "GET", path, foreign, f"Bearer {token}")]
        if kind == "public":
            return [Ask(kind, "GET", rng.choice(("/healthz", "/public/docs", f"/public/{rng.randrange(1000)}")))]
        key, token = rng.choice(m.dpop)
        path = path.split("?", 1)[0]
        proof = key.proof("GET", f"https://{HOST}{path}", token)
        fresh = Ask("allow_dpop", "GET", path, m.returning[0][0], f"DPoP {token}", proof)
        return [fresh] if kind == "allow_dpop" else [fresh, Ask(kind, "GET", path, fresh.client, fresh.authorization,
                                                                  proof)]


# -- transports: each sends an Ask and reads (allowed, reason) from the answer, or raises Unexpected

class Unexpected(Exception):
    """An answer that is not a decision: an RPC error, a 5xx, a body that is not pdp's."""


class GrpcCaller:
    """Envoy's ext_authz gRPC client (``Authorization/Check``), as Envoy fills the request."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def send(self, ask: Ask) -> tuple[bool, str]:
        headers = {":authority": HOST, ":method": ask.method, ":path": ask.path, "x-request-id": os.urandom(8).hex()}
        if ask.authorization:
            headers["authorization"] = ask.authorization
        if ask.dpop:
            headers["dpop"] = ask.dpop
        http = attribute_context_pb2.AttributeContext.HttpRequest(method=ask.method, path=ask.path, host=HOST,
                                                                  scheme="https", protocol="HTTP/2", headers=headers)
        source = attribute_context_pb2.AttributeContext.Peer()
        if ask.client:
            source.certificate = ask.client.quoted
        request = external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
            source=source, request=attribute_context_pb2.AttributeContext.Request(http=http)))
        try:
            response = self.stub.Check(request, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            raise Unexpected(f"RPC error {exc.code()}: {exc.details()}") from None
        reason = response.dynamic_metadata.fields["reason"].string_value
        code = response.status.code
        if code not in (code_pb2.OK, code_pb2.UNAUTHENTICATED, code_pb2.PERMISSION_DENIED) or not reason:
            raise Unexpected(f"status {code} {response.status.message!r}, reason {reason!r}")
        return code == code_pb2.OK, reason


class HttpCaller:
    """``POST /v1/check`` and the HTTP ext_authz endpoint (as Envoy's http_service calls it, the client's
    certificate in RFC 9440 ``Client-Cert`` from the trusted proxy); DPoP goes through ``/v1/check``."""

    def __init__(self, base: str, rng: random.Random) -> None:
        self.base, self.rng = base, rng
        self.client = httpx.Client(base_url=base, timeout=TIMEOUT)

    def close(self) -> None:
        self.client.close()

    def send(self, ask: Ask) -> tuple[bool, str]:
        if ask.dpop is None and self.rng.random() < 0.4:
            return self._ext_authz(ask)
        return self._check(ask)

    def _check(self, ask: Ask) -> tuple[bool, str]:
        headers = {k: v for k, v in (("authorization", ask.authorization), ("dpop", ask.dpop)) if v}
        doc: dict[str, Any] = {"method": ask.method, "path": ask.path, "host": HOST, "scheme": "https",
                               "headers": headers}
        if ask.client:
            doc["client_cert"] = ask.client.pem
        r = self._request("POST", "/v1/check", json=doc)
        try:
            answer = r.json()
            allowed, reason = answer["allowed"], answer["reason"]
        except (ValueError, KeyError, TypeError):
            raise Unexpected(f"/v1/check {r.status_code}: {r.text[:200]!r}") from None
        if r.status_code != 200 or not isinstance(allowed, bool):
            raise Unexpected(f"/v1/check {r.status_code}: {r.text[:200]!r}")
        return allowed, str(reason)

    def _ext_authz(self, ask: Ask) -> tuple[bool, str]:
        headers = {"host": HOST, "x-forwarded-proto": "https"}
        if ask.authorization:
            headers["authorization"] = ask.authorization
        if ask.client:
            headers["client-cert"] = ask.client.client_cert
        r = self._request(ask.method, "/ext_authz" + ask.path, headers=headers)
        reason = r.headers.get("x-pdp-reason", "")
        if not reason or not (r.status_code == 200 or 400 <= r.status_code < 500):
            raise Unexpected(f"/ext_authz {r.status_code} reason {reason!r}: {r.text[:200]!r}")
        return r.status_code == 200, reason

    def _request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        try:
            return self.client.request(method, url, **kw)
        except httpx.HTTPError as exc:
            raise Unexpected(f"{method} {url}: {type(exc).__name__}: {exc}") from None


# -- the server process

@dataclass(frozen=True)
class Sample:
    at: float       # seconds since the soak started
    rss_kib: int
    fds: int
    threads: int


def sample(pid: int, at: float) -> Sample:
    """The process's resident memory (VmRSS), open descriptors and threads, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return Sample(at, int(status["VmRSS"].split()[0]), len(os.listdir(f"/proc/{pid}/fd")),
                  int(status["Threads"].strip()))


def soak_config(folder: Path) -> Path:
    """``pdp dev init``'s pdp.toml made to reach its steady state within the warm-up (small caches, as many
    gRPC handler threads as there are gRPC callers: each holds its own policy engine, several MiB, and the
    pool adds a thread only when calls happen to overlap, so a larger one would keep growing for minutes),
    with the trusted proxy for HTTP ext_authz and DPoP's window."""
    path = folder / "pdp.toml"
    text = path.read_text()
    for table, line in (("[server]", f"grpc_workers = {THREADS['grpc']}"),
                        ("[policy]", f"decision_cache_size = {CACHE_SIZE}"),
                        ("[certificates]", f"cache_size = {CACHE_SIZE}"),
                        ("[tokens]", f"cache_size = {CACHE_SIZE}")):
        if f"\n{table}\n" not in text:
            raise AssertionError(f"pdp dev init wrote no {table} table")
        text = text.replace(f"\n{table}\n", f"\n{table}\n{line}\n", 1)
    text += (f'\n[gateway]\ntrusted_proxies = ["127.0.0.1/32"]\ncert_header = "rfc9440"\n'
             f"\n[dpop]\niat_window = {DPOP_IAT_WINDOW}\n")
    path.write_text(text)
    return path


class Server:
    """``pdp serve --workers 1`` on free loopback ports; counts its decision log lines as they come."""

    def __init__(self, config: Path, http_port: int, grpc_port: int, stderr: Path) -> None:
        self.http, self.grpc = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
        self._stderr = stderr.open("wb")
        self.proc = subprocess.Popen(
            [PDP, "serve", "--config", str(config), "--workers", "1", "--http", f"127.0.0.1:{http_port}",
             "--grpc", self.grpc], stdout=subprocess.PIPE, stderr=self._stderr, start_new_session=True)
        self.stderr_path = stderr
        self.log_lines = 0
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.proc.stdout is not None
        fd, carry = self.proc.stdout.fileno(), b""
        while chunk := os.read(fd, 1 << 20):
            *lines, carry = (carry + chunk).split(b"\n")
            self.log_lines += sum(b'"decision_id"' in line for line in lines)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pdp serve exited {self.proc.returncode}: {self.stderr_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.http}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("pdp serve did not become ready")
            time.sleep(0.1)
        with grpc.insecure_channel(self.grpc) as channel:
            grpc.channel_ready_future(channel).result(timeout=max(1.0, deadline - time.monotonic()))

    def decisions_by_reason(self) -> Counter[str]:
        """``pdp_decisions_total`` by reason, as the server counted."""
        counts: Counter[str] = Counter()
        for line in httpx.get(f"{self.http}/metrics", timeout=TIMEOUT).text.splitlines():
            if line.startswith("pdp_decisions_total{"):
                labels = line[line.index("{") + 1:line.rindex("}")]
                reason = dict(p.split("=", 1) for p in labels.split(",") if "=" in p).get("reason", '""')
                counts[reason.strip('"')] += int(float(line.split()[-1]))
        return counts

    def stop(self) -> str:
        """Stop the server; its standard error."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        self._stderr.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.stderr_path.read_text(errors="replace")


# -- the soak

@dataclass
class Report:
    seconds: float
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)   # (transport, kind)
    reasons: Counter[str] = field(default_factory=Counter)                # reasons answered
    failures: int = 0
    failure_samples: list[str] = field(default_factory=list)
    new_clients: int = 0                 # new-client requests sent
    new_at_warm: int = 0
    new_pool: int = 0
    series: list[Sample] = field(default_factory=list)
    base: Sample | None = None           # idle, before the load
    warm: Sample | None = None           # under load, the warm-up over
    end: Sample | None = None            # under load, at the deadline
    after: Sample | None = None          # idle again, the callers gone
    log_lines: int = 0
    server_reasons: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _sampled: set[tuple[str, str, str]] = field(default_factory=set, repr=False)

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def record(self, transport: str, ask: Ask, got: tuple[bool, str] | None, problem: str = "") -> None:
        with self.lock:
            self.requests[transport, ask.kind] += 1
            if ask.new_client:
                self.new_clients += 1
            if got is not None:
                self.reasons[got[1]] += 1
            if got is not None and got == EXPECTED[ask.kind]:
                return
            self.failures += 1
            answer = problem or f"{'allow' if got and got[0] else 'deny'} {got[1] if got else ''}"
            if len(self.failure_samples) < KEPT_SAMPLES and (transport, ask.kind, answer) not in self._sampled:
                self._sampled.add((transport, ask.kind, answer))  # one sample of each kind of failure
                want = "allow" if EXPECTED[ask.kind][0] else "deny"
                self.failure_samples.append(f"{transport} {ask.kind} {ask.method} {ask.path}: wanted {want} "
                                            f"{EXPECTED[ask.kind][1]}, got {answer}")

    def problems(self) -> list[str]:
        """What the soak found wrong; empty when the server held up."""
        assert self.base and self.warm and self.end and self.after
        found = [f"{self.failures} answers other than the intended ones, e.g. {s}" for s in self.failure_samples[:1]]
        found += [f"  also: {s}" for s in self.failure_samples[1:]]
        allowed_growth = RSS_GROWTH_SHARE * self.warm.rss_kib + RSS_GROWTH_KIB
        if self.end.rss_kib - self.warm.rss_kib > allowed_growth:
            found.append(f"resident memory grew by {(self.end.rss_kib - self.warm.rss_kib) / 1024:.1f} MiB after the "
                         f"warm-up ({self.warm.rss_kib / 1024:.1f} -> {self.end.rss_kib / 1024:.1f} MiB; allowed "
                         f"{allowed_growth / 1024:.1f} MiB)")
        if self.end.fds > self.warm.fds + FD_SLACK_LOADED:
            found.append(f"open descriptors grew under load: {self.warm.fds} after the warm-up, "
                         f"{self.end.fds} at the end")
        if self.end.threads > self.warm.threads + THREAD_SLACK:
            found.append(f"threads grew under load: {self.warm.threads} after the warm-up, "
                         f"{self.end.threads} at the end")
        if self.after.fds > self.base.fds + FD_SLACK_IDLE:
            found.append(f"open descriptors left after the load: {self.base.fds} before, {self.after.fds} after")
        total = self.total
        if self.log_lines != total:
            found.append(f"{total} decisions asked for, {self.log_lines} decision log lines")
        if self.server_reasons != self.reasons:
            found.append(f"the server counted other decisions than the callers got: server {dict(self.server_reasons)}"
                         f", callers {dict(self.reasons)}")
        for transport in THREADS:
            missing = [k for k in EXPECTED if not self.requests[transport, k]]
            if missing:
                found.append(f"{transport}: no request of kind {', '.join(missing)} was sent: the soak proves little")
        return found

    def summary(self) -> str:
        assert self.base and self.warm and self.end and self.after
        per_transport = " ".join(f"{t}={sum(n for (tt, _), n in self.requests.items() if tt == t)}" for t in THREADS)
        kinds = Counter[str]()
        for (_, kind), n in self.requests.items():
            kinds[kind] += n

        def mib(kib: int) -> str:
            return f"{kib / 1024:.1f}"

        rss = [s.rss_kib for s in self.series if s.at >= self.warm.at]
        return (f"soak {self.seconds:.0f}s: {self.total} requests ({per_transport}; "
                f"{', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}), {self.failures} failures, "
                f"{self.new_clients} new-client requests ({self.new_at_warm} in the warm-up, pool {self.new_pool}); "
                f"RSS MiB base {mib(self.base.rss_kib)} warm {mib(self.warm.rss_kib)} at {self.warm.at:.1f}s "
                f"end {mib(self.end.rss_kib)} (min {mib(min(rss))} max {mib(max(rss))} after warm-up) "
                f"after {mib(self.after.rss_kib)}; fds base {self.base.fds} warm {self.warm.fds} "
                f"end {self.end.fds} after {self.after.fds}; threads warm {self.warm.threads} end {self.end.threads}; "
                f"log lines {self.log_lines}; RSS MiB over time {self.trace()}")

    def trace(self, points: int = 8) -> str:
        """Resident memory at a few moments after the warm-up, as ``MiB@seconds``."""
        assert self.warm is not None
        after = [s for s in self.series if s.at >= self.warm.at]
        picked = [after[round(i * (len(after) - 1) / (points - 1))] for i in range(points)] if after else []
        return " ".join(f"{s.rss_kib / 1024:.1f}@{s.at:.0f}" for s in dict.fromkeys(picked))


def _caller(transport: str, server: Server, rng: random.Random) -> GrpcCaller | HttpCaller:
    return GrpcCaller(server.grpc) if transport == "grpc" else HttpCaller(server.http, rng)


def run(server: Server, material: Material, *, seconds: float, max_requests: int, seed: int) -> Report:
    """Drive ``server`` from both transports for ``seconds`` (or ``max_requests``); sample it as it goes."""
    report = Report(seconds=seconds, new_pool=len(material.new))
    pid = server.proc.pid
    stop = threading.Event()
    start = time.monotonic()

    def caller(transport: str, index: int) -> None:
        rng = random.Random(seed * 100 + index)
        plan = Plan(material, rng)
        conn = _caller(transport, server, rng)
        try:
            sent = 0
            while not stop.is_set() and report.total < max_requests:
                for ask in plan.next():
                    try:
                        report.record(transport, ask, conn.send(ask))
                    except Exception as exc:  # whatever it is, a failure to report with the others
                        report.record(transport, ask, None, str(exc) if isinstance(exc, Unexpected) else repr(exc))
                sent += 1
                if sent % RECONNECT[transport] == 0:  # a client going away, another one connecting
                    conn.close()
                    conn = _caller(transport, server, rng)
                if report.failures > MAX_FAILURES:
                    stop.set()
        finally:
            conn.close()

    report.base = sample(pid, 0.0)
    workers = [threading.Thread(target=caller, args=(t, i), name=f"soak-{t}-{i}")
               for i, t in enumerate(t for t, n in THREADS.items() for _ in range(n))]
    for w in workers:
        w.start()
    # The warm-up is over once every cache has been filled twice over by new clients (and at least a few
    # seconds have passed), or at half the time, whichever comes first.
    min_warm, max_warm = min(max(3.0, seconds / 5), seconds / 2), seconds / 2
    try:
        while not stop.is_set() and any(w.is_alive() for w in workers):
            elapsed = time.monotonic() - start
            if elapsed >= seconds:
                break
            stop.wait(min(0.5, seconds - elapsed))
            if server.proc.poll() is not None:
                raise AssertionError(f"pdp serve exited with {server.proc.returncode} during the soak")
            report.series.append(s := sample(pid, time.monotonic() - start))
            if report.warm is None and s.at >= min_warm and (report.new_clients >= 2 * CACHE_SIZE or s.at >= max_warm):
                report.warm, report.new_at_warm = s, report.new_clients
        report.end = sample(pid, time.monotonic() - start)
        report.series.append(report.end)
        report.warm = report.warm or report.end
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=2 * TIMEOUT)
    # The callers have closed their connections: the server's side of them must go too.
    deadline = time.monotonic() + 10
    while (s := sample(pid, time.monotonic() - start)).fds > report.base.fds + FD_SLACK_IDLE \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    report.after = s
    while server.log_lines < report.total and time.monotonic() < deadline + 10:  # the log reader catching up
        time.sleep(0.1)
    report.log_lines = server.log_lines
    report.server_reasons = server.decisions_by_reason()
    return report


def dev_folder(parent: Path) -> Path:
    """A ``pdp dev init`` folder, made by the command as a user runs it."""
    folder = parent / "dev"
    subprocess.run([PDP, "dev", "init", str(folder)], check=True, capture_output=True, timeout=120)
    return folder


def soak_seconds(default: float) -> float:
    """``PDP_SOAK_SECONDS``, or ``default``."""
    value = os.environ.get("PDP_SOAK_SECONDS", "")
    return float(value) if value.strip() else default
