"""Real proxies (nginx, Caddy, HAProxy) in front of pdp and an echo upstream, driven with curl.

A proxy test module starts, once per module, the proxy from its shipped example
(``examples/<proxy>/``), pdp from the example's ``pdp.toml`` and an upstream that answers every
request with what it received as JSON. The examples name the files ``pdp dev init /setup`` writes
and fixed ports; ``render`` swaps those for a temp folder and free loopback ports, and fails if an
example no longer contains what it replaces, so the tests always run the configurations we ship.

``ProxyContract`` holds what every proxy in front of pdp must do; each module subclasses it
(``TestNginx``…) and provides a module-scoped ``stack`` fixture.

A missing proxy binary is a failure, not a skip: ``.ci/run`` installs nginx, caddy, haproxy and curl.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pdp.policies import DEFAULT_POLICY_DIR

from pdp.devpki import DpopKey, Issued, TokenIssuer, dumps_jwks, make_ca, make_client

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

ISSUER = "https://issuer.example.org"
AUDIENCE = "https://api.example.org"
CLIENT_ID = "spiffe://example.org/demo/client"
OTHER_ID = "spiffe://example.org/demo/other"
ADMIN_ID = "spiffe://example.org/admin/ops"
GATEWAY_ID = "spiffe://example.org/gateway"

#: What the examples name, and what ``render`` replaces it with.
SETUP_DIR = "/setup/"
PDP_ADDRESS = "127.0.0.1:8181"
APP_ADDRESS = "127.0.0.1:8080"
PROXY_PORT = "8443"

#: pdp's own identity headers on an allow (``[decision.upstream_headers]``).
PDP_HEADERS = ("x-pdp-spiffe-id", "x-pdp-subject", "x-pdp-client-id", "x-pdp-cert-thumbprint", "x-pdp-decision-id")


def require_binary(name: str, package: str | None = None) -> str:
    """The path of ``name``; a missing proxy fails the test (CI must never skip these)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")  # nginx, haproxy: sbin
    if path is None:
        pytest.fail(f"{name} is not installed: .ci/run installs it (apt-get install -y {package or name})")
    return path


# -- the files `pdp dev init` writes, for one test module


@dataclass(frozen=True)
class Setup:
    """A folder laid out like ``pdp dev init``'s: one CA, clients, the gateway, pdp's and the listener's
    certificates, the issuer's JWKS and the shipped policy."""

    directory: Path
    ca: Issued
    client: Issued
    other: Issued
    issuer: TokenIssuer

    def token(self, leaf: Issued | None = None, *, scope: str = "read write", **kw: Any) -> str:
        return self.issuer.mint(audience=AUDIENCE, scope=scope, bound_to=leaf or self.client, **kw)

    def dpop_token(self, key: DpopKey, *, scope: str = "read") -> str:
        return self.issuer.mint(audience=AUDIENCE, scope=scope, dpop_key=key)

    def cert_files(self, who: str) -> tuple[str, str]:
        return str(self.directory / f"{who}.pem"), str(self.directory / f"{who}.key")


def write_setup(directory: Path) -> Setup:
    ca = make_ca("pdp dev CA")
    client = make_client(ca, spiffe_id=CLIENT_ID, common_name="demo client")
    other = make_client(ca, spiffe_id=OTHER_ID, common_name="other client")
    listener = make_client(ca, spiffe_id=None, common_name="proxy", dns=("localhost",), ips=("127.0.0.1",),
                           client_auth=False)
    gateway = make_client(ca, spiffe_id=GATEWAY_ID, common_name="gateway")
    pdp_server = make_client(ca, spiffe_id=None, common_name="pdp", client_auth=False, dns=("localhost", "pdp"),
                             ips=("127.0.0.1",))
    issuer = TokenIssuer.generate(ISSUER, kid="dev-1")
    files: dict[str, bytes] = {"ca.pem": ca.pem, "jwks.json": dumps_jwks(issuer.jwks).encode()}
    for name, issued in (("client", client), ("other", other), ("envoy", listener),
                         ("gateway", gateway), ("pdp-server", pdp_server)):
        files[f"{name}.pem"] = issued.pem
        files[f"{name}.key"] = issued.key_pem
    for name, content in files.items():
        (directory / name).write_bytes(content)
    policy = directory / "policy"
    policy.mkdir()
    for source in DEFAULT_POLICY_DIR.iterdir():
        if source.suffix in (".rego", ".json") and not source.name.endswith("_test.rego"):
            shutil.copyfile(source, policy / source.name)
    return Setup(directory, ca, client, other, issuer)


def render(source: Path, target: Path, replacements: Mapping[str, str]) -> Path:
    """Copy an example with its paths and ports replaced; each replaced text must be in it."""
    text = source.read_text()
    for old, new in replacements.items():
        assert old in text, f"{source.name} no longer contains {old!r}"
        text = text.replace(old, new)
    target.write_text(text)
    return target


# -- the upstream


class EchoUpstream:
    """Answers every request with JSON: its method, raw path and headers (a list, repeats kept)."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _echo(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                body = json.dumps({"method": self.command, "path": self.path,
                                   "headers": [[k.lower(), v] for k, v in self.headers.items()]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("x-echo-upstream", "1")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _echo

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> EchoUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- pdp and the upstream behind a proxy


@dataclass(frozen=True)
class Behind:
    """What a proxy's example config is rendered against: the setup, the replacements every example
    takes (setup folder, pdp's address, the upstream's), and a free port for the proxy's listener."""

    setup: Setup
    replacements: dict[str, str]
    port: int


@contextmanager
def pdp_and_upstream(tmp: Path, example: Path) -> Iterator[Behind]:
    """pdp serving ``example``'s pdp.toml on a fresh setup in ``tmp``, and an echoing upstream."""
    from servers import free_port, serve_pdp

    from pdp.config import load_config

    setup = write_setup(tmp)
    config = render(example / "pdp.toml", tmp / "pdp.toml", {SETUP_DIR: f"{tmp}/"})
    with serve_pdp(load_config(config)) as (pdp_url, _), EchoUpstream() as app:
        yield Behind(setup, {SETUP_DIR: f"{tmp}/", PDP_ADDRESS: pdp_url.removeprefix("https://"),
                             APP_ADDRESS: f"127.0.0.1:{app.port}"}, free_port())


# -- the proxy process


@contextmanager
def running(argv: Sequence[str], *, port: int, log: Path, cwd: Path,
            env: Mapping[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run a proxy in the foreground until it accepts connections on ``port``; stop it at the end."""
    with log.open("wb") as out:
        process = subprocess.Popen(list(argv), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=dict(env) if env is not None else None)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"{argv[0]} exited with {process.returncode}:\n{log.read_text(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{argv[0]} did not listen on {port}:\n{log.read_text(errors='replace')}")
                time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# -- the client: curl


@dataclass(frozen=True)
class Reply:
    """What curl got: the status (0 when there was no HTTP answer, e.g. a refused handshake)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    error: str = ""

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[-1] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def upstream(self) -> Upstream | None:
        """What the upstream received, if the request got there."""
        if self.status != 200 or self.header("x-echo-upstream") != "1":
            return None
        return Upstream(self.json())

    def __str__(self) -> str:
        return f"{self.status} {self.headers} {self.body[:400]!r} {self.error}"


@dataclass(frozen=True)
class Upstream:
    seen: dict[str, Any]

    @property
    def path(self) -> str:
        return str(self.seen["path"])

    @property
    def method(self) -> str:
        return str(self.seen["method"])

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.seen["headers"] if k == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} reached the upstream {len(values)} times: {values}"
        return values[0] if values else None


def curl(url: str, *, cacert: str, cert: tuple[str, str] | None = None, method: str = "GET",
         headers: Sequence[tuple[str, str]] = (), http1: bool = False, resolve: str | None = None,
         request_target: str | None = None) -> Reply:
    binary = require_binary("curl")
    argv = [binary, "-sS", "-i", "--path-as-is", "--max-time", "20", "--cacert", cacert, "-X", method]
    if resolve is not None:
        argv += ["--resolve", resolve]
    if request_target is not None:  # sent as it is instead of the URL's path: "*", an absolute URI
        argv += ["--request-target", request_target]
    if http1:
        argv.append("--http1.1")
    if cert is not None:
        argv += ["--cert", cert[0], "--key", cert[1]]
    for name, value in headers:
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    if done.returncode != 0 and not done.stdout:
        return Reply(0, (), b"", done.stderr.decode(errors="replace"))
    return parse_reply(done.stdout, done.stderr.decode(errors="replace"))


def parse_reply(answer: bytes, error: str = "") -> Reply:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    parsed = tuple((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
    return Reply(status, parsed, body, error)


# -- one running stack


@dataclass(frozen=True)
class Stack:
    """The proxy on 127.0.0.1:``port`` in front of pdp and the echo upstream, called by name: the
    client sends SNI ``localhost`` and ``Host: localhost:<port>`` (Caddy refuses a Host that is not the
    SNI name when it asks for client certificates)."""

    name: str
    port: int
    setup: Setup

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def request(self, path: str, *, cert: str | None = "client", token: str | None = None, method: str = "GET",
                headers: Sequence[tuple[str, str]] = (), http1: bool = False,
                request_target: str | None = None) -> Reply:
        sent = list(headers)
        if token is not None:
            sent.append(("Authorization", f"Bearer {token}"))
        files = self.setup.cert_files(cert) if cert else None
        return curl(self.url + path, cacert=str(self.setup.directory / "ca.pem"), cert=files, method=method,
                    headers=sent, http1=http1, resolve=f"localhost:{self.port}:127.0.0.1",
                    request_target=request_target)

    def raw(self, request: bytes, *, cert: str | None = "client") -> Reply:
        """Send ``request`` as it is over TLS (SNI localhost, HTTP/1.1 by ALPN) and read until the proxy
        closes: what curl will not send, such as a request without any Host."""
        context = ssl.create_default_context(cafile=str(self.setup.directory / "ca.pem"))
        context.set_alpn_protocols(["http/1.1"])
        if cert:
            context.load_cert_chain(*self.setup.cert_files(cert))
        answer = b""
        with socket.create_connection(("127.0.0.1", self.port), timeout=20) as plain, \
                context.wrap_socket(plain, server_hostname="localhost") as tls:
            tls.sendall(request)
            while chunk := tls.recv(65536):
                answer += chunk
        assert answer, "the proxy closed without answering"
        return parse_reply(answer)


# -- forged headers: a client's own claims about its certificate, in every format pdp reads


def forged_certificate_headers(victim: Issued) -> list[tuple[str, str]]:
    pem = victim.pem.decode()
    b64 = base64.b64encode(victim.der).decode()
    quoted = urllib.parse.quote(pem, safe="")
    body = "".join(pem.strip().splitlines()[1:-1])
    return [
        ("ssl-client-cert", quoted),
        ("Client-Cert", f":{b64}:"),
        ("Client-Cert-Chain", f":{b64}:"),
        ("X-Forwarded-Client-Cert", f'Hash={hashlib.sha256(victim.der).hexdigest()};Cert="{quoted}";'
                                    f"URI={CLIENT_ID}"),
        ("X-Forwarded-Tls-Client-Cert", urllib.parse.quote(body, safe="")),
        ("X-Amzn-Mtls-Clientcert", urllib.parse.quote(pem, safe="+=/")),
    ]


def forged_pdp_headers() -> list[tuple[str, str]]:
    return [("X-Pdp-Spiffe-Id", ADMIN_ID), ("X-Pdp-Subject", "root"), ("X-Pdp-Client-Id", "admin-console"),
            ("X-Pdp-Cert-Thumbprint", "forged"), ("X-Pdp-Decision-Id", "forged")]


def assert_denied(reply: Reply, *statuses: int) -> None:
    assert reply.upstream is None, f"reached the upstream: {reply}"
    assert reply.status in statuses, str(reply)


class ProxyContract:
    """What every proxy example in front of pdp must do. Subclassed by each proxy's test module."""

    def test_the_bound_certificate_and_token_reach_the_upstream_with_pdps_identity(self, stack: Stack) -> None:
        reply = stack.request("/orders?page=2", token=stack.setup.token())
        seen = reply.upstream
        assert seen is not None, str(reply)
        assert (seen.method, seen.path) == ("GET", "/orders?page=2")
        assert seen.header("x-pdp-spiffe-id") == CLIENT_ID
        assert seen.header("x-pdp-subject") == "demo-user"
        assert seen.header("x-pdp-client-id") == "demo-client"
        assert seen.header("x-pdp-cert-thumbprint") == stack.setup.client.thumbprint
        assert seen.header("x-pdp-decision-id")
        assert seen.header("authorization") is None and seen.header("dpop") is None

    def test_another_certificate_with_the_same_token_gets_401_and_a_challenge(self, stack: Stack) -> None:
        reply = stack.request("/orders", cert="other", token=stack.setup.token())
        assert_denied(reply, 401)
        assert 'error="invalid_token"' in (reply.header("www-authenticate") or ""), str(reply)
        assert reply.json()["reason"] == "binding_mismatch"

    def test_no_certificate_is_refused(self, stack: Stack) -> None:
        # Each example asks for a certificate without requiring one, so pdp decides (public paths).
        with_token = stack.request("/orders", cert=None, token=stack.setup.token())
        assert_denied(with_token, 401)
        assert with_token.json()["reason"] == "binding_cert_missing"
        without = stack.request("/orders", cert=None)
        assert_denied(without, 403)
        assert without.json()["reason"] == "cert_required"

    def test_the_original_method_is_what_pdp_judges(self, stack: Stack) -> None:
        token = stack.setup.token(scope="read")
        reply = stack.request("/orders", token=token, method="POST")
        assert_denied(reply, 403)
        assert reply.json()["reason"] == "insufficient_scope"
        seen = stack.request("/orders", token=token, method="HEAD")
        assert seen.status == 200, str(seen)

    def test_certificate_headers_sent_by_the_client_count_for_nothing(self, stack: Stack) -> None:
        token = stack.setup.token()
        forged = forged_certificate_headers(stack.setup.client)
        # Another client's connection claiming the token holder's certificate in every format pdp reads.
        other = stack.request("/orders", cert="other", token=token, headers=forged)
        assert_denied(other, 401)
        assert other.json()["reason"] == "binding_mismatch"
        # No certificate on the connection at all.
        none = stack.request("/orders", cert=None, token=token, headers=forged)
        assert_denied(none, 401)
        assert none.json()["reason"] == "binding_cert_missing"

    def test_a_repeated_authorization_or_dpop_header_is_refused(self, stack: Stack) -> None:
        token = stack.setup.token()
        for name, value in (("Authorization", f"Bearer {stack.setup.token(stack.setup.other)}"),
                            ("DPoP", "a.b.c")):
            reply = stack.request("/orders", token=token, headers=[(name, value), (name, value)])
            assert reply.upstream is None, str(reply)
            assert 400 <= reply.status < 500, str(reply)
            # nginx refuses a second Authorization line itself (400); otherwise pdp does.
            assert reply.header("x-pdp-reason") in (None, "request_invalid"), str(reply)

    def test_pdp_headers_sent_by_the_client_never_reach_the_upstream(self, stack: Stack) -> None:
        forged = forged_pdp_headers()
        seen = stack.request("/orders", token=stack.setup.token(), headers=forged).upstream
        assert seen is not None
        assert seen.header("x-pdp-spiffe-id") == CLIENT_ID and seen.header("x-pdp-subject") == "demo-user"
        assert seen.header("x-pdp-client-id") == "demo-client"
        assert seen.header("x-pdp-cert-thumbprint") == stack.setup.client.thumbprint
        assert seen.header("x-pdp-decision-id") not in (None, "forged")
        # A public path without a token: pdp names the certificate, and nothing names a subject.
        public = stack.request("/public/info", headers=forged).upstream
        assert public is not None
        assert public.header("x-pdp-spiffe-id") == CLIENT_ID
        assert public.header("x-pdp-subject") is None and public.header("x-pdp-client-id") is None
        # Without a certificate either: pdp sets no identity, and the client's claims are gone.
        anonymous = stack.request("/public/info", cert=None, headers=forged).upstream
        assert anonymous is not None
        for name in PDP_HEADERS[:-1]:
            assert anonymous.header(name) is None, name

    def test_forwarded_request_headers_sent_by_the_client_count_for_nothing(self, stack: Stack) -> None:
        forged = [("X-Original-URI", "/public/x"), ("X-Original-Method", "GET"), ("X-Forwarded-Uri", "/public/x"),
                  ("X-Forwarded-Method", "GET"), ("X-Forwarded-Host", "public.example.org"),
                  ("X-Forwarded-Proto", "http")]
        assert_denied(stack.request("/orders", headers=forged), 401, 403)
        assert_denied(stack.request("/admin/users", token=stack.setup.token(), headers=forged), 403)

    @pytest.mark.parametrize("http1", [False, True], ids=["http2", "http1.1"])
    def test_dpop_through_the_proxy(self, stack: Stack, http1: bool) -> None:
        key = DpopKey.generate()
        token = stack.setup.dpop_token(key)

        def send(proof: str, headers: Sequence[tuple[str, str]] = ()) -> Reply:
            return stack.request("/orders?page=1", http1=http1,
                                 headers=[("Authorization", f"DPoP {token}"), ("DPoP", proof), *headers])

        # The proof names the URL the client used: the scheme, the host with its port, the path.
        proof = key.proof("GET", f"{stack.url}/orders", token)
        allowed = send(proof)
        seen = allowed.upstream
        assert seen is not None, str(allowed)
        assert seen.header("authorization") is None and seen.header("dpop") is None
        assert seen.header("x-pdp-subject") == "demo-user"
        replayed = send(proof)
        assert_denied(replayed, 401)
        assert (replayed.header("www-authenticate") or "").startswith("DPoP "), str(replayed)
        assert 'error="invalid_dpop_proof"' in (replayed.header("www-authenticate") or "")
        for wrong in (f"http://localhost:{stack.port}/orders", "https://localhost/orders",
                      f"https://127.0.0.1:{stack.port}/orders", f"{stack.url}/other"):
            assert_denied(send(key.proof("GET", wrong, token)), 401)
        # A client naming another host or scheme for pdp to rebuild the URL from gains nothing.
        forged = [("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "http")]
        assert_denied(send(key.proof("GET", "http://evil.example/orders", token), forged), 401)

    @pytest.mark.parametrize("path", ["/public/%2e%2e/admin", "/public/../admin", "/orders;x=1", "/public%2Fx"])
    def test_a_request_pdp_refuses_as_malformed_is_a_4xx(self, stack: Stack, path: str) -> None:
        reply = stack.request(path, token=stack.setup.token())
        assert reply.upstream is None, str(reply)
        assert 400 <= reply.status < 500, str(reply)
        assert reply.json()["reason"] == "request_invalid"

    @pytest.mark.parametrize("http1", [False, True], ids=["http2", "http1.1"])
    def test_a_host_with_two_values_is_refused(self, stack: Stack, http1: bool) -> None:
        # A proxy that hands pdp one of the values (HAProxy's req.hdr() takes the last) has pdp judge a
        # host the upstream never gets alone. Caddy answers 421 itself, pdp request_invalid.
        for host in (f"admin.internal,localhost:{stack.port}", f"localhost:{stack.port}, admin.internal"):
            reply = stack.request("/orders", token=stack.setup.token(), headers=[("Host", host)], http1=http1)
            assert reply.upstream is None, f"{host}: {reply}"
            assert 400 <= reply.status < 500, f"{host}: {reply}"

    @pytest.mark.parametrize("method", ["GET", "OPTIONS"])
    def test_an_asterisk_target_never_reaches_the_upstream(self, stack: Stack, method: str) -> None:
        # pdp must judge the target the upstream gets: "*" is no path, and none may be judged instead.
        reply = stack.request("", method=method, request_target="*", http1=True,
                              token=stack.setup.token(scope="read"))
        assert reply.status != 0, reply.error
        assert reply.upstream is None, str(reply)
        assert reply.status < 500, str(reply)

    def test_an_absolute_form_target_reaches_the_upstream_only_as_the_path_pdp_judged(self, stack: Stack) -> None:
        for target in (f"{stack.url}/orders?page=2", f"{stack.url}/admin/users"):
            reply = stack.request("", request_target=target, http1=True, token=stack.setup.token(scope="read"))
            assert reply.status != 0, reply.error
            seen = reply.upstream
            if seen is None:
                assert 400 <= reply.status < 500, f"{target}: {reply}"
            else:
                assert target.endswith("/orders?page=2"), f"{target}: {reply}"
                assert seen.path == "/orders?page=2", f"{target}: {reply}"

    @pytest.mark.parametrize("http1", [False, True], ids=["http2", "http1.1"])
    def test_header_names_with_an_underscore_never_reach_the_upstream(self, stack: Stack, http1: bool) -> None:
        # CGI, WSGI, PHP-FPM and Rack read X_Pdp_Subject as X-Pdp-Subject (HTTP_X_PDP_SUBJECT).
        forged = [(name.replace("-", "_"), value)
                  for name, value in forged_pdp_headers() + forged_certificate_headers(stack.setup.client)]
        for cert, path, token in (("client", "/orders", stack.setup.token()), (None, "/public/info", None)):
            reply = stack.request(path, cert=cert, token=token, headers=forged, http1=http1)
            seen = reply.upstream
            assert seen is not None, str(reply)
            assert [name for name, _ in seen.seen["headers"] if "_" in name] == [], str(reply)
        # Nor does pdp read them: another client's certificate claimed under those names counts for nothing.
        other = stack.request("/orders", cert="other", token=stack.setup.token(), headers=forged, http1=http1)
        assert_denied(other, 401)
        assert other.json()["reason"] == "binding_mismatch"

    def test_an_http10_request_without_host_gets_pdps_answer_never_a_5xx(self, stack: Stack) -> None:
        # pdp's own server wants a Host: a sub-request without one is refused before pdp decides.
        denied = stack.raw(b"GET /orders HTTP/1.0\r\n\r\n")
        assert denied.upstream is None, str(denied)
        assert 400 <= denied.status < 500, str(denied)
        bearer = f"Authorization: Bearer {stack.setup.token()}\r\n".encode()
        with_token = stack.raw(b"GET /orders HTTP/1.0\r\n" + bearer + b"\r\n")
        assert with_token.status < 500, str(with_token)
        if with_token.upstream is None:
            assert 400 <= with_token.status < 500, str(with_token)
