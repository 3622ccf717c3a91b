"""HTTP ext_authz: Envoy's ``http_service``, nginx ``auth_request`` and Traefik ``forwardAuth``.

Any method, any path under a configured prefix. Envoy keeps the original
method and appends the original path to the prefix; nginx and Traefik send
the original request in ``X-Original-URI`` / ``X-Original-Method`` and
``X-Forwarded-Method`` / ``X-Forwarded-Uri`` / ``X-Forwarded-Host`` /
``X-Forwarded-Proto``. Which of them is believed, and from whom, is the one
reader's business (``pdp.request_reader``): this module only hands over the
sub-request as received and renders the decision.

The answer: 200 to allow, with the upstream headers as response headers (the
proxy copies them upstream) and ``x-envoy-auth-headers-to-remove`` naming the
headers to strip; the decision's status to deny (401 or 403 for nginx), with ``WWW-Authenticate``
and a small JSON body naming the reason code.

Such a proxy can add and remove headers but cannot change the query string: the one reader marks the
request so, and a policy that changes the query on it is a ``policy_error`` deny. A header's value is
one line here (a second ``set-cookie`` from the policy is not sent).
"""

from __future__ import annotations

from pdp.decision import Decision


def render(decision: Decision, *, statuses: str = "any") -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the answer to the proxy. Every answer names the decision, its reason
    and its status. ``statuses="401/403"`` (nginx ``auth_request``, which turns any other status into a
    500) answers a deny 401 or 403; the real status stays in ``x-pdp-status``."""
    headers: dict[str, str] = {"x-pdp-decision-id": decision.decision_id, "x-pdp-reason": decision.reason,
                               "x-pdp-status": str(decision.status)}
    if decision.allowed:
        headers.update(decision.headers)
        if decision.headers_to_remove:
            headers["x-envoy-auth-headers-to-remove"] = ",".join(decision.headers_to_remove)
        headers.update(decision.response_headers)
        return 200, headers, b""
    body, denial_headers = decision.denial()
    headers.update(denial_headers)
    status = decision.status
    if statuses == "401/403" and status not in (401, 403):
        status = 403
    return status, headers, body.encode()
