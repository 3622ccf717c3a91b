"""Fetching JWKS and discovery documents over HTTP: bounded in time and size."""

from __future__ import annotations

import httpx

MAX_DOCUMENT_BYTES = 1024 * 1024


class FetchError(RuntimeError):
    pass


class HttpFetch:
    """A ``fetch(url) -> bytes`` for key sources: one GET, a timeout, no redirects, at most 1 MiB."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._http = httpx.Client(timeout=timeout, follow_redirects=False,
                                  headers={"accept": "application/json, application/jwk-set+json"})

    def __call__(self, url: str) -> bytes:
        try:
            with self._http.stream("GET", url, timeout=self.timeout) as response:
                if response.status_code != 200:
                    raise FetchError(f"GET {url}: HTTP {response.status_code}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise FetchError(f"GET {url}: larger than {MAX_DOCUMENT_BYTES} bytes")
                return bytes(body)
        except httpx.HTTPError as exc:
            raise FetchError(f"GET {url}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._http.close()
