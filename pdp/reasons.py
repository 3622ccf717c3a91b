"""Stable reason codes for every decision pdp makes.

A reason code names *why* a request was allowed or denied. Codes are stable
strings (they appear in logs, metrics, Envoy dynamic metadata and policy
input), and each one knows how it is shown to an HTTP client: the status, the
RFC 6750 ``error`` code of the ``WWW-Authenticate`` challenge (if any) and
whether the denial is about the token (a ``Bearer`` challenge) or about the
connection (no challenge, 403).

Reasons produced by the core for *invalid* credentials can never be turned
into an allow by a policy; reasons a policy returns are free-form strings, and
the ones listed here with ``source="policy"`` are simply well known.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reason:
    """One reason code and how it is rendered to a client."""

    code: str
    status: int
    #: RFC 6750 §3.1 / RFC 9449 §7.1 error code for the challenge, or None for no error code.
    oauth_error: str | None = None
    #: Send a ``WWW-Authenticate`` challenge with the denial (``Bearer``, or ``DPoP`` on DPoP requests).
    challenge: bool = False
    #: A short, safe description for callers (never contains credential material).
    description: str = ""
    #: Always challenge with the ``DPoP`` scheme (errors that only DPoP has).
    dpop: bool = False


def _r(code: str, status: int, oauth_error: str | None = None, challenge: bool = False,
       description: str = "", dpop: bool = False) -> Reason:
    return Reason(code, status, oauth_error, challenge, description, dpop)


ALLOWED = _r("allowed", 200, description="request allowed")

# -- the request itself
REQUEST_INVALID = _r("request_invalid", 400, description="the request is malformed")
REQUEST_TOO_LARGE = _r("request_too_large", 431, description="request headers are too large")

# -- client certificate (connection identity): no Bearer challenge, the token is not at fault
CERT_MALFORMED = _r("cert_malformed", 403, description="the client certificate could not be parsed")
CERT_UNTRUSTED = _r("cert_untrusted", 403, description="the client certificate is not trusted")
CERT_EXPIRED = _r("cert_expired", 403, description="the client certificate has expired")
CERT_NOT_YET_VALID = _r("cert_not_yet_valid", 403, description="the client certificate is not yet valid")
CERT_REVOKED = _r("cert_revoked", 403, description="the client certificate is revoked")
CERT_REVOCATION_UNKNOWN = _r("cert_revocation_unknown", 403,
                             description="the client certificate's revocation status is unknown")
CERT_SPIFFE_INVALID = _r("cert_spiffe_invalid", 403,
                         description="the client certificate has an invalid SPIFFE ID")
#: On pdp's own revocation list (``pdp revoke subject ID``): the certificate's SPIFFE ID or the token's ``sub``.
SUBJECT_REVOKED = _r("subject_revoked", 403, description="this client identity is revoked")

# -- access token (RFC 6750 invalid_token unless said otherwise)
TOKEN_MALFORMED = _r("token_malformed", 401, "invalid_token", True, "the access token is malformed")
TOKEN_TYPE_INVALID = _r("token_type_invalid", 401, "invalid_token", True,
                        "the token is not an access token of an accepted type")
TOKEN_ALG_NOT_ALLOWED = _r("token_alg_not_allowed", 401, "invalid_token", True,
                           "the token's signing algorithm is not allowed")
TOKEN_ISSUER_UNKNOWN = _r("token_issuer_unknown", 401, "invalid_token", True,
                          "the token's issuer is not trusted")
TOKEN_KEY_UNKNOWN = _r("token_key_unknown", 401, "invalid_token", True,
                       "the token's signing key is unknown")
TOKEN_SIGNATURE_INVALID = _r("token_signature_invalid", 401, "invalid_token", True,
                             "the token's signature is invalid")
TOKEN_EXPIRED = _r("token_expired", 401, "invalid_token", True, "the access token expired")
TOKEN_NOT_YET_VALID = _r("token_not_yet_valid", 401, "invalid_token", True,
                         "the access token is not yet valid")
TOKEN_AUDIENCE_INVALID = _r("token_audience_invalid", 401, "invalid_token", True,
                            "the access token is not meant for this audience")
TOKEN_CLAIMS_INVALID = _r("token_claims_invalid", 401, "invalid_token", True,
                          "the access token's claims are invalid")
TOKEN_UNBOUND = _r("token_unbound", 401, "invalid_token", True,
                   "the access token is not bound to the client certificate")
TOKEN_INACTIVE = _r("token_inactive", 401, "invalid_token", True,
                    "the authorization server says the token is not active")
#: On pdp's own revocation list (``pdp revoke token JTI``), by its ``jti`` claim.
TOKEN_REVOKED = _r("token_revoked", 401, "invalid_token", True, "the access token is revoked")
INTROSPECTION_UNAVAILABLE = _r("introspection_unavailable", 503,
                               description="the authorization server's introspection endpoint is unavailable")
JWKS_UNAVAILABLE = _r("jwks_unavailable", 503, description="the issuer's keys cannot be fetched")

# -- RFC 8705 binding
BINDING_MISMATCH = _r("binding_mismatch", 401, "invalid_token", True,
                      "the access token is bound to another certificate")
BINDING_CERT_MISSING = _r("binding_cert_missing", 401, "invalid_token", True,
                          "the access token is certificate-bound but no client certificate was presented")
#: The same code when a DPoP proof is signed by another key than the token's ``cnf.jkt`` (RFC 9449 §7.1);
#: ``by_code("binding_mismatch")`` answers with the certificate one above, registered first.
DPOP_KEY_MISMATCH = _r("binding_mismatch", 401, "invalid_token", True,
                       "the access token is bound to another DPoP key", dpop=True)
BINDING_DPOP_REQUIRED = _r("binding_dpop_required", 401, "invalid_token", True,
                           "the access token is DPoP-bound and needs a DPoP proof", dpop=True)

# -- RFC 9449 DPoP
DPOP_PROOF_INVALID = _r("dpop_proof_invalid", 401, "invalid_dpop_proof", True, "the DPoP proof is invalid",
                        dpop=True)
DPOP_NONCE_REQUIRED = _r("dpop_nonce_required", 401, "use_dpop_nonce", True,
                         "the resource server requires a DPoP nonce", dpop=True)
STORE_UNAVAILABLE = _r("store_unavailable", 503, description="shared state is unavailable; denied")

# -- policy
POLICY_DENIED = _r("policy_denied", 403, description="denied by policy")
POLICY_ERROR = _r("policy_error", 403, description="the policy could not be evaluated")
#: ``policy.engine = "opa"``: the OPA server did not answer, or not with a decision, within ``policy.opa.timeout``.
POLICY_UNAVAILABLE = _r("policy_unavailable", 503, description="the policy engine is unavailable; denied")
#: A decision waiting on the network (key set, introspection, revocation, store, OPA) that would not be
#: made before the caller's gRPC deadline: a deny answer, where the deadline would be an RPC error.
DECISION_TIMEOUT = _r("decision_timeout", 503, description="no decision before the caller's deadline; denied")
TOKEN_REQUIRED = _r("token_required", 401, None, True, "an access token is required")
CERT_REQUIRED = _r("cert_required", 403, description="a client certificate is required")
SCOPE_INSUFFICIENT = _r("insufficient_scope", 403, "insufficient_scope", True,
                        "the access token lacks the required scope")
SPIFFE_ID_DENIED = _r("spiffe_id_denied", 403, description="this client identity may not access this path")

INTERNAL_ERROR = _r("internal_error", 403, description="the decision failed; denied")

_BY_CODE: dict[str, Reason] = {}
for _reason in [r for r in globals().values() if isinstance(r, Reason)]:
    _BY_CODE.setdefault(_reason.code, _reason)
del _reason


def by_code(code: str, default: Reason = POLICY_DENIED) -> Reason:
    """The registered reason for ``code``; unknown policy reasons render like ``default``."""
    return _BY_CODE.get(code, default)


def is_known(code: str) -> bool:
    """Whether ``code`` is one of pdp's reason codes (a policy may answer any text as its reason)."""
    return code in _BY_CODE


def all_reasons() -> tuple[Reason, ...]:
    return tuple(_BY_CODE.values())
