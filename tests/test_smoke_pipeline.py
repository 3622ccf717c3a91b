from __future__ import annotations

from conftest import bound_token, check_request


def test_bound_token_on_its_certificate_is_allowed(make_pdp, pki, issuer, engine):
    pdp = make_pdp(engine=engine)
    decision = pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
    assert decision.allowed, decision.explanation()
    assert decision.headers["x-pdp-spiffe-id"] == "spiffe://example.org/demo/client"
