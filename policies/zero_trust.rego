# pdp's default zero-trust policy.
#
# Every request must come over a connection with a verified client certificate
# from an allowed trust domain, and carry an access token bound to that
# certificate (RFC 8705) — except on public paths. Routes in the data document
# narrow which SPIFFE IDs may call a path and which scopes the token needs.
#
# pdp has already refused every *invalid* certificate or token before this
# policy runs; here only *missing* credentials and authorization are decided.
#
# Data (data.pdp.config, see data.json):
#   public_paths           exact paths, or prefixes ending in "/", open to anyone
#   allowed_trust_domains  SPIFFE trust domains whose workloads may call at all ([] = any)
#   require_bound_token    false accepts tokens without cnf.x5t#S256
#   routes                 [{prefix, methods?, spiffe_ids?, scopes?}]: every route whose path
#                          prefix (whole segments: "/admin" covers "/admin" and "/admin/x")
#                          and method (if listed) match applies; spiffe_ids entries are
#                          exact IDs or prefixes ending in "/*"; every listed scope is required.
#                          A request no route covers (say, an unlisted method) is denied.
#
# The result is an object: "allowed", "reason" and, on insufficient_scope, "scope" (the scopes
# the matching routes require, space-separated), which pdp sends in the RFC 6750 challenge.
#
# input.path is the request path without query string (a pdp addition to the
# opa-envoy-plugin input; attributes.request.http.path keeps the query). pdp refuses
# paths that are not in normal form (dot segments, "//", needless percent-encoding,
# encoded control characters, overlong UTF-8) before the policy runs, so prefix matching
# here cannot be escaped with them; route prefixes match regardless of case.
package pdp.authz

import rego.v1

config := data.pdp.config

default result := {"allowed": false, "reason": "policy_denied"}

result := {"allowed": true, "reason": "public_path"} if {
	public_path
} else := {"allowed": false, "reason": "cert_required"} if {
	not input.cert.present
} else := {"allowed": false, "reason": "spiffe_id_denied"} if {
	not trust_domain_allowed
} else := {"allowed": false, "reason": "token_required"} if {
	not input.token.present
} else := {"allowed": false, "reason": "token_unbound"} if {
	config.require_bound_token
	not input.binding.bound
} else := {"allowed": false, "reason": "policy_denied"} if {
	count(matching_routes) == 0
} else := {"allowed": false, "reason": "spiffe_id_denied"} if {
	spiffe_id_denied
} else := {"allowed": false, "reason": "insufficient_scope", "scope": concat(" ", sort(required_scopes))} if {
	scope_missing
} else := {"allowed": true, "reason": "allowed"}

public_path if input.path in config.public_paths

public_path if {
	some p in config.public_paths
	endswith(p, "/")
	startswith(input.path, p)
}

trust_domain_allowed if count(config.allowed_trust_domains) == 0

trust_domain_allowed if input.cert.trust_domain in config.allowed_trust_domains

# The routes that apply to this request (their rules are rules of every route, so all must hold).
# A prefix matches on segment boundaries: "/admin" covers "/admin" and "/admin/x", not "/administrator".
# Routes restrict, so they match regardless of case: an upstream that routes case-insensitively serves
# "/Admin/users" as "/admin/users", and the admin rules must apply. (Public paths, which open, match exactly.)
matching_routes := [route |
	some route in config.routes
	startswith(lower(concat("", [input.path, "/"])), lower(concat("", [trim_suffix(route.prefix, "/"), "/"])))
	input.attributes.request.http.method in object.get(route, "methods", [input.attributes.request.http.method])
]

spiffe_id_denied if {
	some route in matching_routes
	route.spiffe_ids
	not spiffe_id_listed(route.spiffe_ids)
}

spiffe_id_listed(ids) if input.cert.spiffe_id in ids

spiffe_id_listed(ids) if {
	some pattern in ids
	endswith(pattern, "/*")
	startswith(input.cert.spiffe_id, trim_suffix(pattern, "*"))
}

scope_missing if {
	some scope in required_scopes
	not scope in token_scopes
}

# Every scope the routes that apply require. On insufficient_scope the result names them all in its
# "scope" member (sorted, space-separated): pdp puts it into the RFC 6750 challenge
# (WWW-Authenticate: Bearer error="insufficient_scope", scope="read write"), so that a client asks
# its authorization server for a token with the scopes this request needs.
required_scopes contains scope if {
	some route in matching_routes
	some scope in object.get(route, "scopes", [])
}

# A token without scopes has none. A rule with a default is never undefined, so `not scope in token_scopes`
# means the same on every engine; OPA takes `not scope in input.token.scopes` as undefined (and so would
# allow) when the member is missing, where regorus takes it as true.
default token_scopes := []

token_scopes := input.token.scopes
