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
#   routes                 [{prefix, methods?, spiffe_ids?, scopes?}]: every route whose
#                          prefix (and method) matches applies; spiffe_ids entries are exact
#                          IDs or prefixes ending in "/*"; scopes are all required
package pdp.authz

import rego.v1

config := data.pdp.config

http := input.attributes.request.http

request_path := split(http.path, "?")[0]

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
} else := {"allowed": false, "reason": "spiffe_id_denied"} if {
	some route in matching_routes
	not spiffe_allowed(route)
} else := {"allowed": false, "reason": "insufficient_scope"} if {
	some route in matching_routes
	not scopes_granted(route)
} else := {"allowed": true, "reason": "allowed"}

public_path if {
	some p in config.public_paths
	path_matches(p)
}

path_matches(p) if {
	endswith(p, "/")
	startswith(request_path, p)
}

path_matches(p) if {
	not endswith(p, "/")
	request_path == p
}

trust_domain_allowed if count(config.allowed_trust_domains) == 0

trust_domain_allowed if input.cert.trust_domain in config.allowed_trust_domains

matching_routes contains route if {
	some route in config.routes
	path_matches(route.prefix)
	method_matches(route)
}

method_matches(route) if not route.methods

method_matches(route) if http.method in route.methods

spiffe_allowed(route) if not route.spiffe_ids

spiffe_allowed(route) if {
	some id in route.spiffe_ids
	id_matches(id, input.cert.spiffe_id)
}

id_matches(pattern, id) if pattern == id

id_matches(pattern, id) if {
	endswith(pattern, "/*")
	startswith(id, trim_suffix(pattern, "*"))
}

scopes_granted(route) if not route.scopes

scopes_granted(route) if {
	every scope in route.scopes {
		scope in input.token.scopes
	}
}
