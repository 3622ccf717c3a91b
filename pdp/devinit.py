"""``pdp dev init DIR``: a complete development setup in one folder.

Writes a CA, two client certificates with SPIFFE IDs, a token issuer's key
and JWKS, an access token bound to the first client certificate, a copy of
the shipped policy with a data document for the demo, and ``pdp.toml``
referring only to files in DIR; plus the certificates for running behind
Envoy (``examples/envoy``): Envoy's listener (``envoy.pem``), Envoy as the
gateway that calls pdp (``gateway.pem``) and pdp's own listener
(``pdp-server.pem``), all from the same CA.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pdp.devpki import TokenIssuer, dumps_jwks, make_ca, make_client
from pdp.policies import DEFAULT_POLICY_DIR

ISSUER = "https://issuer.example.org"
AUDIENCE = "https://api.example.org"
CLIENT_ID = "spiffe://example.org/demo/client"
OTHER_ID = "spiffe://example.org/demo/other"
GATEWAY_ID = "spiffe://example.org/gateway"
FILES = ("pdp.toml", "ca.pem", "ca.key", "client.pem", "client.key", "other.pem", "other.key", "issuer.key",
         "jwks.json", "token.jwt", "envoy.pem", "envoy.key", "gateway.pem", "gateway.key", "pdp-server.pem",
         "pdp-server.key")

CONFIG = f"""\
# pdp development configuration, written by `pdp dev init`. Every path is relative to this file.

[server]
http = "127.0.0.1:8181"
grpc = "127.0.0.1:9191"   # Envoy ext_authz (gRPC); "" turns it off
reload_interval = 2.0

[policy]
engine = "regorus"
paths = ["policy"]

[certificates]
[[certificates.trust_bundles]]
name = "example.org"
file = "ca.pem"
trust_domain = "example.org"

[tokens]
require_bound = true   # zero trust: every token must be bound to the client certificate (RFC 8705)
leeway = 30

[[tokens.issuers]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
algorithms = ["ES256"]
jwks_file = "jwks.json"

[decision]
remove_authorization = true
"""


#: Every method the demo routes give a scope rule to. The route naming the callers lists them too: a route
#: without methods would cover every method, and so let TRACE or any made-up method through.
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _demo_data() -> dict[str, object]:
    return {"pdp": {"config": {
        "public_paths": ["/healthz", "/public/"],
        "allowed_trust_domains": ["example.org"],
        "require_bound_token": True,
        "routes": [
            {"prefix": "/", "methods": list(METHODS), "spiffe_ids": [CLIENT_ID, "spiffe://example.org/admin/*"]},
            {"prefix": "/admin", "spiffe_ids": ["spiffe://example.org/admin/*"], "scopes": ["admin"]},
            {"prefix": "/", "methods": ["GET", "HEAD"], "scopes": ["read"]},
            {"prefix": "/", "methods": ["POST", "PUT", "PATCH", "DELETE"], "scopes": ["write"]},
        ],
    }}}


def dev_init(target: Path, *, force: bool = False) -> list[Path]:
    existing = [target / f for f in FILES if (target / f).exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists (use --force to overwrite)")
    target.mkdir(parents=True, exist_ok=True)
    ca = make_ca("pdp dev CA")
    client = make_client(ca, spiffe_id=CLIENT_ID, common_name="demo client")
    other = make_client(ca, spiffe_id=OTHER_ID, common_name="other client")
    # For running behind Envoy (examples/envoy): Envoy's listener, Envoy as pdp's caller, pdp's listener.
    envoy = make_client(ca, spiffe_id=None, common_name="envoy", dns=("localhost", "envoy"), ips=("127.0.0.1",),
                        client_auth=False)
    gateway = make_client(ca, spiffe_id=GATEWAY_ID, common_name="gateway")
    pdp_server = make_client(ca, spiffe_id=None, common_name="pdp", client_auth=False,
                             dns=("localhost", "pdp", "pdp-1", "pdp-2"), ips=("127.0.0.1",))
    issuer = TokenIssuer.generate(ISSUER, kid="dev-1")
    token = issuer.mint(audience=AUDIENCE, subject="demo-user", client_id="demo-client",
                        scope="read write", bound_to=client, lifetime=30 * 24 * 3600)
    written: dict[str, bytes] = {
        "ca.pem": ca.pem, "ca.key": ca.key_pem,
        "client.pem": client.pem, "client.key": client.key_pem,
        "other.pem": other.pem, "other.key": other.key_pem,
        "issuer.key": issuer.key_pem, "jwks.json": dumps_jwks(issuer.jwks).encode(),
        "token.jwt": token.encode() + b"\n", "pdp.toml": CONFIG.encode(),
        "envoy.pem": envoy.pem, "envoy.key": envoy.key_pem, "gateway.pem": gateway.pem,
        "gateway.key": gateway.key_pem, "pdp-server.pem": pdp_server.pem, "pdp-server.key": pdp_server.key_pem,
    }
    paths = []
    for name, content in written.items():
        path = target / name
        path.write_bytes(content)
        if name.endswith(".key"):
            path.chmod(0o600)
        paths.append(path)
    policy = target / "policy"
    policy.mkdir(exist_ok=True)
    for rego in DEFAULT_POLICY_DIR.glob("*.rego"):
        shutil.copyfile(rego, policy / rego.name)
        paths.append(policy / rego.name)
    (policy / "data.json").write_text(json.dumps(_demo_data(), indent=2) + "\n")
    paths.append(policy / "data.json")
    return paths


_CURL = (
    r"""curl -s --retry 20 --retry-connrefused --retry-delay 1 """
    r"""http://HTTP/v1/check -H 'content-type: application/json' -d "{\"method\": \"GET\", """
    r"""\"path\": \"/orders\", \"host\": \"api.example.org\", """
    r"""\"headers\": {\"authorization\": \"Bearer $(cat DIR/token.jwt)\"}, """
    r"""\"client_cert\": \"$(awk '{printf "%s\\n", $0}' DIR/CERT)\"}"""
    '"'
)


def curl_command(target: Path, cert: str, http: str = "127.0.0.1:8181") -> str:
    """A curl call of ``POST /v1/check`` with ``cert`` and the dev token (awk escapes the PEM for JSON); it
    waits for a server that is still starting (pasted right after ``pdp serve … &``)."""
    return _CURL.replace("HTTP", http).replace("DIR", str(target)).replace("CERT", cert)


def curl_examples(target: Path, http: str = "127.0.0.1:8181") -> str:
    return (f"# allowed: client.pem presents the token bound to it\n{curl_command(target, 'client.pem', http)}\n\n"
            f"# denied (binding_mismatch): the same token from another client's certificate\n"
            f"{curl_command(target, 'other.pem', http)}\n")
