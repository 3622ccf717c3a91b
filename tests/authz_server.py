"""A small OAuth 2.0 authorization server for the tests, built on authlib's server classes.

It issues certificate-bound opaque access tokens with the client credentials
grant, authenticating clients by RFC 8705 ``tls_client_auth`` (the client's
certificate must carry its registered SPIFFE ID), and answers RFC 7662
introspection for resource servers authenticated by ``client_secret_basic``
or ``tls_client_auth``, with ``cnf.x5t#S256`` in its answers. It serves over
mutual TLS on a loopback port (uvicorn + Starlette; pdp's TLS protocol
classes hand the client certificate to the app).
"""

from __future__ import annotations

import json
import secrets
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from authlib.oauth2.rfc6749 import AuthorizationServer, ClientMixin, OAuth2Request, TokenMixin
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from cryptography import x509
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pdp.credentials.rfc8705 import thumbprint
from pdp.service.listener_tls import ListenerTls, tls_protocols, uvicorn_ssl_options


@dataclass
class Client(ClientMixin):  # type: ignore[misc]
    client_id: str
    spiffe_id: str | None = None
    secret: str | None = None
    auth_methods: tuple[str, ...] = ("tls_client_auth",)
    scopes: tuple[str, ...] = ("read", "write")

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None

    def get_allowed_scope(self, scope: str) -> str:
        return " ".join(s for s in (scope or "").split() if s in self.scopes)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return self.secret is not None and secrets.compare_digest(self.secret, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in self.auth_methods

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"


@dataclass
class Token(TokenMixin):  # type: ignore[misc]
    access_token: str
    client_id: str
    scope: str
    issued_at: int
    expires_at: int
    x5t_s256: str
    revoked: bool = False

    def check_client(self, client: Client) -> bool:
        return client.client_id == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_at - self.issued_at

    def is_expired(self) -> bool:
        return time.time() >= self.expires_at

    def is_revoked(self) -> bool:
        return self.revoked


class Request2(OAuth2Request):  # type: ignore[misc]
    """An authlib request carrying the form and the client certificate of a Starlette request."""

    def __init__(self, method: str, uri: str, headers: Any, form: dict[str, str],
                 cert_der: bytes | None) -> None:
        super().__init__(method, uri, headers=headers)
        self.payload = BasicOAuth2Payload(form)
        self._form = form
        self.cert_der = cert_der

    @property
    def form(self) -> dict[str, str]:
        return self._form

    @property
    def args(self) -> dict[str, str]:
        return {}


def _cert_names(der: bytes | None) -> set[str]:
    if not der:
        return set()
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(san.get_values_for_type(x509.UniformResourceIdentifier))


class TlsClientCredentialsGrant(ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["tls_client_auth"]  # noqa: RUF012 - authlib's class attribute


@dataclass
class AuthorizationServerApp:
    issuer: str
    audience: str
    clients: dict[str, Client]
    tokens: dict[str, Token] = field(default_factory=dict)
    introspections: int = 0
    lifetime: int = 3600

    def __post_init__(self) -> None:
        app = self

        class Server(AuthorizationServer):  # type: ignore[misc]
            def query_client(self, client_id: str) -> Client | None:
                return app.clients.get(client_id)

            def save_token(self, token: dict[str, Any], request: Request2) -> None:
                now = int(time.time())
                app.tokens[token["access_token"]] = Token(
                    access_token=token["access_token"], client_id=request.client.client_id,
                    scope=token.get("scope", ""), issued_at=now, expires_at=now + app.lifetime,
                    x5t_s256=thumbprint(request.cert_der))

            def create_oauth2_request(self, request: Request2) -> Request2:
                return request

            def handle_response(self, status: int, body: Any, headers: Any) -> tuple[int, Any, Any]:
                return status, body, headers

            def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
                pass

        class Introspection(IntrospectionEndpoint):  # type: ignore[misc]
            CLIENT_AUTH_METHODS = ["client_secret_basic", "tls_client_auth"]  # noqa: RUF012

            def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
                app.introspections += 1
                return app.tokens.get(token_string)

            def check_permission(self, token: Token, client: Client, request: Request2) -> bool:
                return client.client_id.startswith("rs-")

            def introspect_token(self, token: Token) -> dict[str, Any]:
                return {"active": True, "client_id": token.client_id, "token_type": "Bearer",
                        "scope": token.scope, "sub": token.client_id, "aud": app.audience, "iss": app.issuer,
                        "exp": token.expires_at, "iat": token.issued_at, "cnf": {"x5t#S256": token.x5t_s256}}

        def tls_client_auth(query_client: Any, request: Request2) -> Client | None:
            client = query_client(request.payload.data.get("client_id"))
            if client and client.spiffe_id and client.spiffe_id in _cert_names(request.cert_der):
                return client
            return None

        self.server = Server(scopes_supported=["read", "write"])
        self.server.register_client_auth_method("tls_client_auth", tls_client_auth)
        self.server.register_grant(TlsClientCredentialsGrant)
        self.server.register_token_generator(
            "default", lambda **kw: {"token_type": "Bearer", "access_token": secrets.token_urlsafe(32),
                                     "expires_in": app.lifetime, "scope": kw.get("scope") or ""})
        self.server.register_endpoint(Introspection)

    async def _request(self, request: Request) -> Request2:
        form = dict(urllib.parse.parse_qsl((await request.body()).decode("utf-8"), keep_blank_values=True))
        tls = request.scope.get("extensions", {}).get("tls") or {}
        return Request2(request.method, str(request.url), request.headers, form, tls.get("client_cert_der"))

    async def token(self, request: Request) -> Response:
        status, body, headers = self.server.create_token_response(await self._request(request))
        return _response(status, body, headers)

    async def introspect(self, request: Request) -> Response:
        status, body, headers = self.server.create_endpoint_response("introspection", await self._request(request))
        return _response(status, body, headers)

    def asgi(self) -> Starlette:
        return Starlette(routes=[Route("/token", self.token, methods=["POST"]),
                                 Route("/introspect", self.introspect, methods=["POST"])])


def _response(status: int, body: Any, headers: Any) -> Response:
    # One request per connection, so that stopping the server mid-test leaves no idle connection behind.
    return Response(json.dumps(body), status_code=status, headers={**dict(headers or []), "connection": "close"},
                    media_type="application/json")


class RunningServer:
    def __init__(self, app: AuthorizationServerApp, tls: ListenerTls, port: int) -> None:
        options = uvicorn_ssl_options(tls)
        options["ssl_cert_reqs"] = ssl.CERT_OPTIONAL  # introspection clients may use Basic instead
        self.server = uvicorn.Server(uvicorn.Config(app.asgi(), host="127.0.0.1", port=port, log_level="warning",
                                                    timeout_graceful_shutdown=2, **options, **tls_protocols()))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"https://127.0.0.1:{port}"

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("authorization server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

