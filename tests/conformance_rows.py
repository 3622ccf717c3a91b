"""The conformance matrix: raw requests in a neutral form, each with the one answer every entry point must give.

A row says what a client (and the proxy in front of pdp) sent — the method, the raw target exactly as
it was on the wire, the header lines in order with their repeats, the host, the client certificate the
proxy presents and whether the peer talking to pdp is a trusted proxy — and what pdp must answer:
allow or deny, and the reason code. ``conformance_entry_points`` turns a row into each protocol's form.

Credentials are named, not pasted: ``Token("client")`` is ``Bearer`` plus the token of that name,
``Proof()`` a fresh DPoP proof for this very request (minted per entry point, so no two entry points
share a ``jti``). Expected reasons are the core's (``pdp/reasons.py``, the pipeline's request checks
and the shipped policy with the route table in ``POLICY_DATA``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GATEWAY = "spiffe://example.org/gateway"
CLIENT_SPIFFE = "spiffe://example.org/demo/client"
ADMIN_SPIFFE = "spiffe://example.org/admin/ops"

#: The shipped policy's data with one method-specific route (/reports: GET and HEAD need the 'reports'
#: scope) in front of a route for every method: a method read in the wrong case escapes the first.
POLICY_DATA = {
    "pdp": {
        "config": {
            "public_paths": ["/healthz", "/public/"],
            "allowed_trust_domains": ["example.org"],
            "require_bound_token": True,
            "routes": [
                {"prefix": "/admin", "spiffe_ids": ["spiffe://example.org/admin/*"], "scopes": ["admin"]},
                {"prefix": "/reports", "methods": ["GET", "HEAD"], "scopes": ["reports"]},
                {"prefix": "/", "scopes": ["read"]},
                {"prefix": "/", "methods": ["POST", "PUT", "PATCH", "DELETE"], "scopes": ["write"]},
            ],
        }
    }
}

#: Entry point names (``conformance_entry_points.ENTRY_POINTS`` implements each).
CHECK = "check"                # POST /v1/check, the JSON document
ENVOY_HTTP = "envoy_http"      # /ext_authz, Envoy http_service: prefix + original target, original method
NGINX = "nginx"                # /ext_authz, nginx auth_request: X-Original-URI / X-Original-Method
TRAEFIK = "traefik"            # /ext_authz, Traefik forwardAuth: X-Forwarded-Method/-Uri/-Host/-Proto
GRPC = "grpc"                  # Envoy gRPC ext_authz, attributes.request.http.headers (repeats joined)
GRPC_RAW = "grpc_raw"          # Envoy gRPC ext_authz with encode_raw_headers: header_map lines
ASGI_CONFIG = "asgi_config"    # PdpMiddleware(config=...)
ASGI_PDP = "asgi_pdp"          # PdpMiddleware(pdp=...)

ALL = (CHECK, ENVOY_HTTP, NGINX, TRAEFIK, GRPC, GRPC_RAW, ASGI_CONFIG, ASGI_PDP)
#: Entry points whose certificate arrives in a proxy's header (the others carry it in the protocol).
CERT_HEADER_READERS = frozenset({ENVOY_HTTP, NGINX, TRAEFIK, ASGI_CONFIG, ASGI_PDP})
#: Entry points that read Envoy's x-forwarded-client-cert (and so gateway.xfcc_by).
XFCC_READERS = frozenset({ENVOY_HTTP, ASGI_CONFIG, ASGI_PDP})
#: Entry points that read a gateway's original-request headers.
FORWARDED_READERS = frozenset({NGINX, TRAEFIK})
GRPC_ONLY = frozenset({GRPC, GRPC_RAW})


@dataclass(frozen=True)
class Token:
    """An ``Authorization`` value: ``scheme``, ``separator``, the named token, then ``suffix``."""

    name: str
    scheme: str = "Bearer"
    separator: str = " "
    suffix: str = ""


@dataclass(frozen=True)
class Proof:
    """A fresh DPoP proof by the named key; ``htm``/``htu`` default to the row's own method and URI."""

    key: str = "dpop"
    token: str | None = "dpop"  # the token whose hash is 'ath'
    htm: str | None = None
    htu: str | None = None


@dataclass(frozen=True)
class Joined:
    """Several values in one header line, as a proxy joins repeated lines (or a client writes them)."""

    parts: tuple[str | Token | Proof, ...]
    separator: str = ","


Value = str | Token | Proof | Joined
Header = tuple[str, Value]


@dataclass(frozen=True)
class Row:
    id: str
    expect: tuple[bool, str]
    method: str = "GET"
    target: str = "/orders"
    hosts: tuple[str, ...] = ("api.test",)
    headers: tuple[Header, ...] = ()
    #: The client certificate (a name in the materials) the proxy presents, or the transport carries.
    cert: str | None = None
    #: How the certificate header is written: "ok", "garbage" (unreadable), and for XFCC only "no_by"
    #: (no By), "other_by" (another proxy's By), "client_first" (a client-written element, then the
    #: gateway's own with ``other_cert``).
    cert_form: str = "ok"
    other_cert: str = "other"
    #: The proxy's certificate header arrives this many times (each line a whole header).
    cert_lines: int = 1
    #: Whether the peer that hands the request to pdp is a trusted proxy (127.0.0.1) or not (127.0.0.2).
    trusted: bool = True
    #: nginx / Traefik: the gateway's original-target header a second time, naming this target.
    forwarded_twice: str | None = None
    #: Send the very same request (the same DPoP proof) twice: the first must be allowed, the second
    #: must get ``expect``.
    replay: bool = False
    #: Upstream header expectations on an allow: name → the value the upstream sees, or None for absent.
    upstream: tuple[tuple[str, str | None], ...] = ()
    #: The entry points this row is about (None: all of them).
    only: frozenset[str] | None = None
    #: An HTTP server may refuse these raw bytes itself before pdp sees them (h11 refuses a second Host;
    #: it may refuse an oversized head): such a refusal, with the reason's status, also counts.
    transport_refusal: bool = False
    why: str = field(default="", compare=False)

    def applies_to(self, entry_point: str) -> bool:
        return self.only is None or entry_point in self.only


AUTH = ("authorization", Token("client"))
DPOP_AUTH = ("authorization", Token("dpop", scheme="DPoP"))
PDP_IDENTITY = (("x-pdp-spiffe-id", CLIENT_SPIFFE), ("x-pdp-subject", "demo-user"),
                ("x-pdp-client-id", "demo-client"), ("authorization", None), ("dpop", None))
NO_IDENTITY = (("x-pdp-spiffe-id", None), ("x-pdp-subject", None), ("x-pdp-client-id", None),
               ("x-pdp-cert-thumbprint", None), ("authorization", None))
FORGED_IDENTITY: tuple[Header, ...] = (
    ("X-PDP-SPIFFE-ID", ADMIN_SPIFFE), ("x-pdp-subject", "root"), ("x-pdp-client-id", "forged-client"),
    ("x-pdp-cert-thumbprint", "forged-thumbprint"), ("x-pdp-decision-id", "forged-decision"))

ALLOWED = (True, "allowed")
PUBLIC = (True, "public_path")


def deny(reason: str) -> tuple[bool, str]:
    return False, reason


INVALID = deny("request_invalid")
TOO_LARGE = deny("request_too_large")


def bound(id: str, expect: tuple[bool, str], **kw: Any) -> Row:
    """A row with the client's certificate and its bound token (plus what ``kw`` changes)."""
    kw.setdefault("cert", "client")
    kw.setdefault("headers", (AUTH,))
    return Row(id, expect, **kw)


def dpop(id: str, expect: tuple[bool, str], proof: Proof | None = Proof(), **kw: Any) -> Row:
    """A DPoP row: the client's certificate, ``Authorization: DPoP`` and one proof (unless None)."""
    headers: tuple[Header, ...] = (DPOP_AUTH,) if proof is None else (DPOP_AUTH, ("dpop", proof))
    kw.setdefault("headers", headers)
    kw.setdefault("cert", "client")
    return Row(id, expect, **kw)


ROWS: tuple[Row, ...] = (
    # -- ordinary requests
    bound("bound_token_on_its_certificate", ALLOWED, upstream=PDP_IDENTITY),
    bound("query_string", ALLOWED, target="/orders?page=2&sort=asc"),
    bound("empty_query", ALLOWED, target="/orders?"),
    bound("post_with_write_scope", ALLOWED, method="POST"),
    bound("post_without_write_scope", deny("insufficient_scope"), method="POST",
          headers=(("authorization", Token("client_read")),)),
    bound("head_request", ALLOWED, method="HEAD"),
    bound("webdav_method_on_an_any_method_route", ALLOWED, method="PROPFIND",
          why="the /ext_authz endpoint answers any method"),
    bound("admin_route_by_an_admin", ALLOWED, target="/admin/users", cert="admin",
          headers=(("authorization", Token("admin")),), upstream=(("x-pdp-spiffe-id", ADMIN_SPIFFE),)),
    bound("admin_route_by_a_client", deny("spiffe_id_denied"), target="/admin/users"),
    bound("admin_route_without_trailing_slash", deny("spiffe_id_denied"), target="/admin"),
    bound("administrator_is_not_the_admin_route", ALLOWED, target="/administrator"),
    bound("percent_encoded_utf8_path", ALLOWED, target="/caf%C3%A9"),
    bound("dot_segments_in_the_query_are_not_the_path", ALLOWED, target="/orders?next=/../admin"),
    Row("public_path_without_credentials", PUBLIC, target="/public/x", upstream=NO_IDENTITY),
    Row("health_check_without_credentials", PUBLIC, target="/healthz"),
    Row("head_on_a_public_path", PUBLIC, method="HEAD", target="/public/x"),
    Row("public_prefix_without_its_slash_is_protected", deny("cert_required"), target="/public"),
    Row("no_certificate_no_token", deny("cert_required")),
    Row("certificate_without_token", deny("token_required"), cert="client"),
    Row("token_without_certificate", deny("binding_cert_missing"), headers=(AUTH,)),
    bound("token_with_another_certificate", deny("binding_mismatch"), cert="other"),
    bound("admin_token_stolen_by_a_client", deny("binding_mismatch"), target="/admin/users",
          headers=(("authorization", Token("admin")),)),
    bound("expired_token", deny("token_expired"), headers=(("authorization", Token("expired")),)),
    bound("token_not_yet_valid", deny("token_not_yet_valid"), headers=(("authorization", Token("not_yet")),)),
    bound("plain_jwt_typ", deny("token_type_invalid"), headers=(("authorization", Token("typ_jwt")),)),
    bound("token_for_another_audience", deny("token_audience_invalid"),
          headers=(("authorization", Token("audience")),)),
    bound("unknown_issuer", deny("token_issuer_unknown"), headers=(("authorization", Token("unknown_issuer")),)),
    bound("signature_by_another_key", deny("token_signature_invalid"),
          headers=(("authorization", Token("bad_signature")),)),
    bound("unknown_key_id", deny("token_key_unknown"), headers=(("authorization", Token("unknown_kid")),)),
    bound("unbound_token", deny("token_unbound"), headers=(("authorization", Token("unbound")),)),
    bound("alg_none", deny("token_alg_not_allowed"), headers=(("authorization", Token("alg_none")),)),
    bound("garbage_token", deny("token_malformed"), headers=(("authorization", "Bearer abc"),)),
    bound("tab_after_the_scheme", deny("token_malformed"),
          headers=(("authorization", Token("client", separator="\t")),)),
    bound("text_after_the_token", deny("token_malformed"), headers=(("authorization", Token("client", suffix=" x")),)),
    bound("lower_case_scheme", ALLOWED, headers=(("authorization", Token("client", scheme="bearer")),)),
    bound("basic_credentials_are_no_token", deny("token_required"), headers=(("authorization", "Basic dXNlcjpwYXNz"),)),
    bound("empty_authorization", deny("token_required"), headers=(("authorization", ""),)),
    bound("whitespace_around_the_credential", ALLOWED,
          headers=(("authorization", Token("client", scheme=" Bearer", suffix=" ")),)),
    bound("non_ascii_byte_in_the_credential", deny("token_malformed"), headers=(("authorization", "Bearer caf\xe9"),)),
    bound("token_in_the_query_is_not_read", deny("token_required"), headers=(),
          target="/orders?access_token=eyJhbGciOiJFUzI1NiJ9.e30.sig"),
    bound("expired_certificate", deny("cert_expired"), cert="expired",
          headers=(("authorization", Token("expired_cert")),)),
    bound("certificate_of_an_unknown_ca", deny("cert_untrusted"), cert="foreign_ca",
          headers=(("authorization", Token("foreign_ca")),)),
    bound("server_certificate_as_client", deny("cert_untrusted"), cert="server_eku",
          headers=(("authorization", Token("server_eku")),)),
    bound("spiffe_id_of_another_trust_domain", deny("cert_untrusted"), cert="other_domain",
          headers=(("authorization", Token("other_domain")),)),
    bound("unreadable_certificate", deny("cert_malformed"), cert_form="garbage"),
    Row("basic_credentials_on_a_public_path", PUBLIC, target="/public/x",
        headers=(("authorization", "Basic dXNlcjpwYXNz"),), upstream=(("authorization", None),)),
    Row("invalid_token_on_a_public_path", deny("token_expired"), target="/public/x",
        headers=(("authorization", Token("expired")),), cert="client",
        why="a presented credential that fails is denied whatever the path"),

    # -- method case: methods are compared upper-cased everywhere
    bound("lower_case_get_on_a_method_specific_route", deny("insufficient_scope"), method="get", target="/reports"),
    bound("mixed_case_get_on_a_method_specific_route", deny("insufficient_scope"), method="Get", target="/reports"),
    bound("lower_case_post_needs_the_write_scope", deny("insufficient_scope"), method="post",
          headers=(("authorization", Token("client_read")),)),
    bound("get_with_the_reports_scope", ALLOWED, target="/reports",
          headers=(("authorization", Token("client_reports")),)),

    # -- path normal form: dot segments, encoded slashes and backslashes, ';' parameters, fragments
    Row("dot_dot_segment", INVALID, target="/public/../admin"),
    Row("encoded_dot_dot_segment", INVALID, target="/public/%2e%2e/admin"),
    Row("upper_case_encoded_dot_dot_segment", INVALID, target="/public/%2E%2E/admin"),
    Row("half_encoded_dot_dot_segment", INVALID, target="/public/.%2e/admin"),
    Row("dot_segment", INVALID, target="/public/./x"),
    Row("encoded_slash", INVALID, target="/public%2Fx", why="HTTP ext_authz once judged the decoded path"),
    Row("lower_case_encoded_slash", INVALID, target="/public%2fadmin"),
    Row("dot_dot_then_encoded_slash", INVALID, target="/public/..%2fadmin"),
    Row("encoded_backslashes", INVALID, target="/public%5C..%5Cadmin"),
    Row("backslashes", INVALID, target="/public\\..\\admin"),
    Row("backslash", INVALID, target="/public\\x"),
    Row("semicolon_parameter", INVALID, target="/admin;/x"),
    Row("semicolon_parameter_on_a_public_path", INVALID, target="/public/x;jsessionid=1"),
    Row("encoded_semicolon", INVALID, target="/public%3Bx"),
    Row("double_slash", INVALID, target="//admin"),
    Row("empty_segment", INVALID, target="/public//x"),
    Row("encoded_unreserved_letter", INVALID, target="/%70ublic/x"),
    Row("encoded_hash_before_dot_segments", INVALID, target="/public/x%23/../../admin",
        why="a decoded '#' turns the dot segments into a fragment"),
    Row("encoded_question_mark_before_dot_segments", INVALID, target="/public/%3F/../admin",
        why="a decoded '?' turns the dot segments into a query"),
    Row("fragment_in_the_target", INVALID, target="/public/x#/../../admin"),

    # -- repeated headers: a singleton twice is refused
    bound("two_authorization_headers", INVALID, headers=(("authorization", Token("other")), AUTH),
          why="once only the last was verified while the upstream got both"),
    bound("the_same_authorization_twice", INVALID, headers=(AUTH, AUTH)),
    bound("authorization_in_two_cases", INVALID, headers=(("Authorization", Token("client")), AUTH)),
    dpop("two_dpop_proofs", INVALID, headers=(DPOP_AUTH, ("dpop", Proof()), ("dpop", Proof())),
         why="RFC 9449 §4.3: not more than one DPoP header"),
    bound("two_host_headers", INVALID, hosts=("api.test", "evil.test"), transport_refusal=True),
    bound("certificate_header_twice", INVALID, cert_lines=2, only=CERT_HEADER_READERS),
    bound("original_target_header_twice", INVALID, forwarded_twice="/public/x", only=FORWARDED_READERS),
    bound("two_credentials_in_one_line", INVALID,
          headers=(("authorization", Joined((Token("other"), Token("client")), ", ")),),
          why="as a proxy joins two lines"),
    dpop("two_dpop_proofs_in_one_line", INVALID, headers=(DPOP_AUTH, ("dpop", Joined((Proof(), Proof()))))),
    bound("two_hosts_in_one_host_line", INVALID, hosts=("api.test,evil.test",)),
    bound("a_list_header_may_repeat", ALLOWED, headers=(AUTH, ("accept", "text/html"), ("accept", "application/json"))),

    # -- certificate headers from an untrusted peer are ignored
    bound("forged_certificate_header_with_a_stolen_token", deny("binding_cert_missing"), trusted=False),
    Row("forged_admin_certificate_header", deny("cert_required"), cert="admin", trusted=False),
    Row("untrusted_peer_on_a_public_path", PUBLIC, target="/public/x", trusted=False),
    bound("forged_x_forwarded_for", deny("binding_cert_missing"), trusted=False,
          headers=(AUTH, ("x-forwarded-for", "127.0.0.1"), ("x-real-ip", "127.0.0.1"))),
    # -- XFCC from the trusted proxy but not written by it (gateway.xfcc_by)
    bound("xfcc_element_without_by", deny("cert_malformed"), cert_form="no_by", only=XFCC_READERS),
    bound("xfcc_element_by_another_proxy", deny("cert_malformed"), cert_form="other_by", only=XFCC_READERS),
    bound("xfcc_client_element_before_the_gateways", deny("binding_mismatch"), cert_form="client_first",
          only=XFCC_READERS, why="the element the gateway appended last is the client's"),
    Row("forged_original_request_headers", deny("cert_required"), target="/admin/users",
        headers=(("x-original-uri", "/public/x"), ("x-original-method", "GET"), ("x-forwarded-uri", "/public/x"),
                 ("x-forwarded-method", "GET"), ("x-forwarded-prefix", "/public"))),

    # -- x-pdp-* headers a client sends never reach the upstream
    bound("forged_identity_headers_on_an_allowed_request", ALLOWED, headers=(AUTH, *FORGED_IDENTITY),
          upstream=PDP_IDENTITY),
    Row("forged_identity_headers_on_a_public_path", PUBLIC, target="/public/x", headers=FORGED_IDENTITY,
        upstream=NO_IDENTITY),
    bound("forged_x_pdp_header_pdp_does_not_set", ALLOWED,
          headers=(AUTH, ("x-pdp-roles", "admin"), ("X-Pdp-Tenant", "acme")),
          upstream=(("x-pdp-roles", None), ("x-pdp-tenant", None)), why="x-pdp-* is pdp's namespace"),
    bound("forged_identity_header_twice", ALLOWED,
          headers=(AUTH, ("X-Pdp-Subject", "root"), ("x-pdp-subject", "admin")),
          upstream=(("x-pdp-subject", "demo-user"),)),

    # -- oversized parts
    bound("path_over_8_kib", TOO_LARGE, target="/orders/" + "a" * (8 * 1024 + 64)),
    bound("over_200_headers", TOO_LARGE, headers=(AUTH, *((f"x-h{i}", "v") for i in range(250)))),
    bound("a_64_kib_header", TOO_LARGE, headers=(AUTH, ("x-big", "b" * (64 * 1024))), transport_refusal=True),
    bound("grpc_request_over_4_mib", TOO_LARGE, headers=(AUTH, ("x-big", "c" * (5 * 1024 * 1024))),
          only=GRPC_ONLY, why="a deny, not RESOURCE_EXHAUSTED"),

    # -- DPoP (RFC 9449)
    dpop("dpop_bound_token_with_its_proof", ALLOWED, upstream=(("dpop", None), ("authorization", None))),
    dpop("dpop_proof_replayed", deny("dpop_proof_invalid"), replay=True),
    dpop("dpop_proof_for_another_uri", deny("dpop_proof_invalid"), proof=Proof(htu="https://api.test/other")),
    dpop("dpop_proof_for_another_method", deny("dpop_proof_invalid"), proof=Proof(htm="POST")),
    dpop("dpop_proof_for_another_token", deny("dpop_proof_invalid"), proof=Proof(token="client")),
    dpop("dpop_token_without_proof", deny("dpop_proof_invalid"), proof=None),
    Row("dpop_token_downgraded_to_bearer", deny("binding_dpop_required"), cert="client",
        headers=(("authorization", Token("dpop")),)),
    dpop("dpop_proof_ignores_the_query", ALLOWED, target="/orders?page=2"),
    dpop("dpop_host_with_its_port", ALLOWED, hosts=("api.test:8443",)),
    dpop("dpop_lower_case_method", ALLOWED, method="get", proof=Proof(htm="GET")),
    dpop("dpop_proof_for_the_http_scheme", deny("dpop_proof_invalid"), proof=Proof(htu="http://api.test/orders")),
    dpop("dpop_host_in_upper_case", ALLOWED, hosts=("API.Test",), proof=Proof(htu="https://api.test/orders")),
    dpop("dpop_host_with_the_default_port", ALLOWED, hosts=("api.test:443",),
         proof=Proof(htu="https://api.test/orders")),

    # -- the host names the target
    Row("host_that_smuggles_a_path", INVALID, hosts=("api.test/admin",), target="/public/x"),
    Row("host_with_userinfo", INVALID, hosts=("evil.test@api.test",), target="/public/x"),
)
