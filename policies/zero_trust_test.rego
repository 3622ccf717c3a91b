# Tests of the default zero-trust policy against the shipped data.json.
# Run them with `pdp policy test` (like `opa test`).
package pdp.authz_test

import rego.v1

cert := {
	"present": true,
	"spiffe_id": "spiffe://example.org/demo/client",
	"trust_domain": "example.org",
	"thumbprint": "x",
}

admin_cert := object.union(cert, {"spiffe_id": "spiffe://example.org/admin/ops"})

foreign_cert := object.union(cert, {"spiffe_id": "spiffe://evil.example/client", "trust_domain": "evil.example"})

token(scopes) := {"present": true, "scopes": scopes, "sub": "u"}

bound := {"method": "x5t#S256", "bound": true}

unbound := {"method": null, "bound": false}

req(method, path, c, t, b) := {
	"attributes": {"request": {"http": {"method": method, "path": path, "host": "api", "headers": {}}}},
	"path": split(path, "?")[0],
	"cert": c,
	"token": t,
	"binding": b,
}

no_cert := {"present": false}

no_token := {"present": false}

test_public_path_needs_nothing if {
	r := data.pdp.authz.result with input as req("GET", "/healthz", no_cert, no_token, unbound)
	r.allowed
	r.reason == "public_path"
}

test_public_prefix_with_query if {
	r := data.pdp.authz.result with input as req("GET", "/public/logo.png?v=2", no_cert, no_token, unbound)
	r.allowed
}

test_public_exact_path_is_not_a_prefix if {
	r := data.pdp.authz.result with input as req("GET", "/healthz/deep", no_cert, no_token, unbound)
	not r.allowed
	r.reason == "cert_required"
}

test_cert_required if {
	r := data.pdp.authz.result with input as req("GET", "/orders", no_cert, token(["read"]), bound)
	not r.allowed
	r.reason == "cert_required"
}

test_foreign_trust_domain_denied if {
	r := data.pdp.authz.result with input as req("GET", "/orders", foreign_cert, token(["read"]), bound)
	not r.allowed
	r.reason == "spiffe_id_denied"
}

test_token_required if {
	r := data.pdp.authz.result with input as req("GET", "/orders", cert, no_token, unbound)
	not r.allowed
	r.reason == "token_required"
}

test_unbound_token_denied if {
	r := data.pdp.authz.result with input as req("GET", "/orders", cert, token(["read"]), unbound)
	not r.allowed
	r.reason == "token_unbound"
}

test_read_allowed if {
	r := data.pdp.authz.result with input as req("GET", "/orders", cert, token(["read"]), bound)
	r.allowed
}

test_write_needs_write_scope if {
	r := data.pdp.authz.result with input as req("POST", "/orders", cert, token(["read"]), bound)
	not r.allowed
	r.reason == "insufficient_scope"
}

test_write_allowed_with_write_scope if {
	r := data.pdp.authz.result with input as req("POST", "/orders", cert, token(["write"]), bound)
	r.allowed
}

test_admin_needs_admin_spiffe_id if {
	r := data.pdp.authz.result with input as req("GET", "/admin/users", cert, token(["read", "admin"]), bound)
	not r.allowed
	r.reason == "spiffe_id_denied"
}

test_admin_needs_admin_scope if {
	r := data.pdp.authz.result with input as req("GET", "/admin/users", admin_cert, token(["read"]), bound)
	not r.allowed
	r.reason == "insufficient_scope"
}

test_admin_allowed if {
	r := data.pdp.authz.result with input as req("GET", "/admin/users", admin_cert, token(["read", "admin"]), bound)
	r.allowed
}

test_a_method_no_route_covers_is_denied if {
	r := data.pdp.authz.result with input as req("OPTIONS", "/orders", cert, token(["read", "write"]), bound)
	not r.allowed
	r.reason == "policy_denied"
}

test_admin_without_trailing_slash_is_the_admin_route if {
	r := data.pdp.authz.result with input as req("GET", "/admin", cert, token(["read", "admin"]), bound)
	not r.allowed
	r.reason == "spiffe_id_denied"
}

test_a_longer_segment_is_not_under_the_prefix if {
	r := data.pdp.authz.result with input as req("GET", "/administrator", cert, token(["read"]), bound)
	r.allowed
}

test_routes_match_regardless_of_case if {
	r := data.pdp.authz.result with input as req("GET", "/Admin/users", cert, token(["read"]), bound)
	not r.allowed
	r.reason == "spiffe_id_denied"
}

test_public_paths_match_exactly if {
	r := data.pdp.authz.result with input as req("GET", "/PUBLIC/x", no_cert, no_token, unbound)
	not r.allowed
	r.reason == "cert_required"
}

test_a_token_without_scopes_has_none if {
	r := data.pdp.authz.result with input as req("GET", "/orders", cert, {"present": true, "sub": "u"}, bound)
	not r.allowed
	r.reason == "insufficient_scope"
}

test_a_token_without_scopes_is_enough_where_no_scope_is_needed if {
	routes := [{"prefix": "/", "methods": ["GET"]}]
	r := data.pdp.authz.result with input as req("GET", "/orders", cert, {"present": true, "sub": "u"}, bound)
		with data.pdp.config.routes as routes
	r.allowed
}

# insufficient_scope names the scopes the request needs (RFC 6750 §3 scope attribute): all those of the
# routes that apply, the ones the token has included, sorted and space-separated.
test_insufficient_scope_names_the_scope_the_route_needs if {
	r := data.pdp.authz.result with input as req("POST", "/orders", cert, token(["read"]), bound)
	r.reason == "insufficient_scope"
	r.scope == "write"
}

test_insufficient_scope_names_every_scope_of_every_route_that_applies if {
	r := data.pdp.authz.result with input as req("GET", "/admin/users", admin_cert, token(["read"]), bound)
	r.reason == "insufficient_scope"
	r.scope == "admin read"
}

test_insufficient_scope_of_a_token_without_scopes_names_the_scope if {
	r := data.pdp.authz.result with input as req("HEAD", "/orders", cert, {"present": true, "sub": "u"}, bound)
	r.reason == "insufficient_scope"
	r.scope == "read"
}

test_only_insufficient_scope_names_a_scope if {
	allowed := data.pdp.authz.result with input as req("POST", "/orders", cert, token(["write"]), bound)
	allowed.allowed
	not allowed.scope
	unbound_token := data.pdp.authz.result with input as req("POST", "/orders", cert, token(["read"]), unbound)
	unbound_token.reason == "token_unbound"
	not unbound_token.scope
}
