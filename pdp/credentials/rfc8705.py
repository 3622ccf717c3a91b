"""RFC 8705, OAuth 2.0 mutual-TLS client authentication and certificate-bound access tokens.

§3.1: a bound token carries ``cnf.x5t#S256``, the base64url-encoded (no
padding) SHA-256 of the DER certificate. A resource server accepts it only on
a connection whose client certificate has that thumbprint.
"""

from __future__ import annotations

import hashlib
import hmac

from pdp import reasons
from pdp.credentials.jose import b64url_encode
from pdp.errors import Denied

BINDING_METHOD = "x5t#S256"


def thumbprint(der: bytes) -> str:
    """The ``x5t#S256`` thumbprint of a DER certificate."""
    return b64url_encode(hashlib.sha256(der).digest())


def check_binding(token_x5t: str, cert_thumbprint: str | None) -> None:
    """Raise ``Denied`` unless the token's ``cnf.x5t#S256`` names the presented certificate."""
    if cert_thumbprint is None:
        raise Denied(reasons.BINDING_CERT_MISSING,
                     "the token is bound to a certificate (cnf.x5t#S256) but none was presented")
    # Constant-time, so the comparison leaks nothing about how much of a thumbprint matched.
    if not hmac.compare_digest(token_x5t.encode("ascii", "replace"), cert_thumbprint.encode("ascii")):
        raise Denied(reasons.BINDING_MISMATCH,
                     f"the token is bound to certificate {token_x5t[:12]}…, "
                     f"the connection presented {cert_thumbprint[:12]}…")
