"""Calling an authorization server's RFC 7662 introspection endpoint: authlib's client authentication
(``client_secret_basic``, ``client_secret_post``, or RFC 8705 ``tls_client_auth`` with a client
certificate) over an httpx client with a timeout and a size limit."""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from authlib.oauth2.auth import ClientAuth

from pdp.credentials.jose import json_object

MAX_ANSWER_BYTES = 64 * 1024


class IntrospectionError(RuntimeError):
    pass


class IntrospectionClient:
    """An ``Introspect`` callable (token → answer) for one authorization server; ``close()`` when done."""

    def __init__(self, endpoint: str, *, client_id: str, auth_method: str, client_secret: str | None = None,
                 client_cert: Path | None = None, client_key: Path | None = None, ca: Path | None = None,
                 timeout: float = 3.0) -> None:
        verify: ssl.SSLContext | bool = True
        if ca is not None or client_cert is not None:
            context = ssl.create_default_context(cafile=str(ca) if ca else None)
            if client_cert is not None:
                context.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
            verify = context
        self.endpoint = endpoint
        self._http = httpx.Client(verify=verify, timeout=timeout, follow_redirects=False)
        # tls_client_auth (RFC 8705 §2): the certificate authenticates; the body names the client_id.
        self._auth = ClientAuth(client_id, client_secret, "none" if auth_method == "tls_client_auth" else auth_method)

    def __call__(self, token: str) -> Mapping[str, Any]:
        body = urllib.parse.urlencode({"token": token, "token_type_hint": "access_token"})
        headers = {"content-type": "application/x-www-form-urlencoded", "accept": "application/json"}
        url, headers, body = self._auth.prepare("POST", self.endpoint, headers, body)
        try:
            response = self._http.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise IntrospectionError(f"POST {self.endpoint}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise IntrospectionError(f"POST {self.endpoint}: HTTP {response.status_code}")
        if len(response.content) > MAX_ANSWER_BYTES:
            raise IntrospectionError(f"POST {self.endpoint}: answer larger than {MAX_ANSWER_BYTES} bytes")
        return json_object(response.content)

    def close(self) -> None:
        self._http.close()
