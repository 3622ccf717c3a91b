"""Mint a client certificate and a token bound to it (RFC 8705), then ask a running pdp about it.

    pdp dev init dev && pdp serve --config dev/pdp.toml &
    python examples/bound_client.py --dev dev --spiffe-id spiffe://example.org/demo/client

Uses the CA and issuer key that `pdp dev init` wrote, so every certificate and token it mints is one
the dev setup trusts. Prints pdp's answer and exits 0 when the request is allowed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx
from cryptography import x509

from pdp.devpki import Issued, TokenIssuer, load_private_key, make_client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dev", type=Path, default=Path("dev"), help="the folder `pdp dev init` wrote")
    parser.add_argument("--url", default="http://127.0.0.1:8181")
    parser.add_argument("--spiffe-id", default="spiffe://example.org/demo/client")
    parser.add_argument("--scope", default="read")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--path", default="/orders")
    args = parser.parse_args(argv)

    ca = Issued(x509.load_pem_x509_certificate((args.dev / "ca.pem").read_bytes()),
                load_private_key((args.dev / "ca.key").read_bytes()))
    client = make_client(ca, spiffe_id=args.spiffe_id, common_name="example client")
    issuer = TokenIssuer("https://issuer.example.org", load_private_key((args.dev / "issuer.key").read_bytes()),
                         "dev-1")
    token = issuer.mint(audience="https://api.example.org", scope=args.scope, bound_to=client)
    answer = httpx.post(f"{args.url}/v1/check", json={
        "method": args.method, "path": args.path, "host": "api.example.org",
        "headers": {"authorization": f"Bearer {token}"}, "client_cert": client.pem.decode(),
    }).json()
    print(json.dumps({k: answer[k] for k in ("allowed", "status", "reason", "decision_id")}, indent=2))
    return 0 if answer["allowed"] else 1


if __name__ == "__main__":
    sys.exit(main())
