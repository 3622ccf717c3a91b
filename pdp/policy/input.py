"""The policy's ``input`` document: opa-envoy-plugin's shape plus what pdp verified.

``input.attributes.request.http`` / ``input.attributes.source`` /
``input.parsed_path`` / ``input.parsed_query`` are laid out as Envoy's
ext_authz plugin for OPA lays them out, for every adapter, so a policy written
for that plugin runs unchanged. pdp adds ``input.cert``, ``input.token``,
``input.binding`` and ``input.path`` (the path without its query string).
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from pdp.certificates.identity import CertIdentity
from pdp.credentials.tokens import VerifiedToken
from pdp.request import CheckRequest

NO_CERT: dict[str, Any] = {"present": False}
NO_TOKEN: dict[str, Any] = {"present": False}


def parse_path(path: str) -> tuple[list[str], dict[str, list[str]]]:
    """``/a/b?x=1&x=2`` → (["a", "b"], {"x": ["1", "2"]}), as opa-envoy-plugin's parsed_path/parsed_query.

    Like the plugin: the path is percent-decoded, leading slashes are dropped and
    the rest is split on ``/``, so ``/`` gives ``[""]`` and ``/a/`` ``["a", ""]``.
    """
    raw_path, _, query = path.partition("?")
    raw_path = raw_path.split("#", 1)[0]
    segments = urllib.parse.unquote(raw_path).lstrip("/").split("/")
    parsed_query: dict[str, list[str]] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        parsed_query.setdefault(key, []).append(value)
    return segments, parsed_query


def build_input(request: CheckRequest, identity: CertIdentity | None, token: VerifiedToken | None,
                binding: dict[str, Any]) -> dict[str, Any]:
    path_only = request.path.split("?", 1)[0].split("#", 1)[0]
    parsed_path, parsed_query = parse_path(request.path)
    source: dict[str, Any] = {"address": {"socketAddress": {"address": request.source_address}}}
    if identity is not None:
        source["principal"] = identity.spiffe_id or identity.subject
        source["certificate"] = identity.url_encoded_pem
    doc: dict[str, Any] = {
        "attributes": {
            "request": {
                "http": {
                    "method": request.method,
                    "path": request.path,
                    "host": request.host,
                    "scheme": request.scheme,
                    "protocol": request.protocol,
                    "headers": dict(request.headers),
                },
            },
            "source": source,
            "contextExtensions": dict(request.context.get("context_extensions", {})),
            "metadataContext": request.context.get("metadata_context", {}),
        },
        "path": path_only,
        "parsed_path": parsed_path,
        "parsed_query": parsed_query,
        "cert": identity.policy_view if identity is not None else NO_CERT,
        "token": token.policy_view if token is not None else NO_TOKEN,
        "binding": binding,
    }
    return doc
