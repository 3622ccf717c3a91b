"""Calling an authorization server's RFC 7662 introspection endpoint: authlib's client authentication
(``client_secret_basic``, ``client_secret_post``, or RFC 8705 ``tls_client_auth`` with a client
certificate) over ``HttpFetch``: the timeout bounds the whole exchange, the answer is read as it arrives
and refused past 64 KiB or in a content coding (a small gzip answer cannot inflate), and neither a proxy
nor credentials nor CA files are taken from the environment: the token and the client's secret go to the
configured endpoint and nowhere else."""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from authlib.oauth2.auth import ClientAuth

from pdp.credentials.http_fetch import FetchError, HttpFetch
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
        self._timeout = timeout
        self._fetch = HttpFetch(timeout, verify=verify)
        # tls_client_auth (RFC 8705 §2): the certificate authenticates; the body names the client_id.
        self._auth = ClientAuth(client_id, client_secret, "none" if auth_method == "tls_client_auth" else auth_method)

    def __call__(self, token: str) -> Mapping[str, Any]:
        body = urllib.parse.urlencode({"token": token, "token_type_hint": "access_token"})
        headers = {"content-type": "application/x-www-form-urlencoded", "accept": "application/json"}
        url, headers, body = self._auth.prepare("POST", self.endpoint, headers, body)
        content_type = headers.pop("content-type")
        accept = headers.pop("accept")
        try:
            answer = self._fetch.post(url, body.encode(), content_type=content_type, accept=accept,
                                      timeout=self._timeout, max_bytes=MAX_ANSWER_BYTES, headers=headers)
        except FetchError as exc:
            raise IntrospectionError(str(exc)) from exc
        return json_object(answer)

    def close(self) -> None:
        self._fetch.close()
