"""Revocation by CRLs per trust bundle: real CRLs signed by the test CAs."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from conftest import bound_token, check_request
from servers import serve_pdp

from pdp import reasons
from pdp.certificates.trust import ChainVerifier, TrustBundle, load_bundle
from pdp.config import load_config
from pdp.devpki import make_ca, make_client, make_crl
from pdp.errors import Denied, LoadError


def bundle_with(tmp_path, pki, crls: dict[str, bytes], require: bool = False) -> TrustBundle:
    (tmp_path / "root.pem").write_bytes(pki.root.pem)
    paths = []
    for name, data in crls.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    return load_bundle(tmp_path / "root.pem", "corp", None, "k", crls=paths, crls_key="crls", require_crl=require)


def denied(verifier: ChainVerifier, chain, now=None) -> reasons.Reason:
    with pytest.raises(Denied) as err:
        verifier.verify(chain, now or time.time())
    return err.value.reason


def test_a_revoked_leaf_is_cert_revoked(tmp_path, pki):
    revoked = make_client(pki.intermediate, spiffe_id="spiffe://example.org/gone")
    b = bundle_with(tmp_path, pki, {"inter.crl": make_crl(pki.intermediate, (revoked,))})
    v = ChainVerifier([b])
    assert denied(v, (revoked.der, pki.intermediate.der)) is reasons.CERT_REVOKED
    assert v.verify(pki.chain(), time.time()).spiffe_id == "spiffe://example.org/demo/client"


def test_a_revoked_intermediate_revokes_every_leaf_under_it(tmp_path, pki):
    b = bundle_with(tmp_path, pki, {"root.crl": make_crl(pki.root, (pki.intermediate,))})
    assert denied(ChainVerifier([b]), pki.chain()) is reasons.CERT_REVOKED


def test_a_crl_past_its_next_update_fails_closed(tmp_path, pki):
    stale = make_crl(pki.intermediate, (), days=1, last_update=datetime.now(UTC) - timedelta(days=3))
    b = bundle_with(tmp_path, pki, {"inter.crl": stale})
    assert denied(ChainVerifier([b]), pki.chain()) is reasons.CERT_REVOCATION_UNKNOWN


def test_require_crl_refuses_an_issuer_without_one(tmp_path, pki):
    b = bundle_with(tmp_path, pki, {"root.crl": make_crl(pki.root)}, require=True)
    assert denied(ChainVerifier([b]), pki.chain()) is reasons.CERT_REVOCATION_UNKNOWN


def test_a_crl_in_a_bundle_cas_name_but_signed_by_another_key_is_refused_at_load(tmp_path, pki):
    impostor = make_ca("test root")  # the same subject name as the real root, another key
    with pytest.raises(LoadError) as err:
        bundle_with(tmp_path, pki, {"bad.crl": make_crl(impostor)})
    assert err.value.key == "crls"


def test_a_crl_signed_by_a_stranger_revokes_nothing(tmp_path, pki):
    stranger = make_ca("test intermediate")  # claims to be the intermediate's issuer name, another key
    b = bundle_with(tmp_path, pki, {"forged.crl": make_crl(stranger, (pki.client,))})
    assert ChainVerifier([b]).verify(pki.chain(), time.time()).spiffe_id == "spiffe://example.org/demo/client"


def test_garbage_in_a_crl_file_is_a_load_error(tmp_path, pki):
    with pytest.raises(LoadError):
        bundle_with(tmp_path, pki, {"bad.crl": b"not a crl"})


def test_a_cached_identity_is_not_kept_past_the_crls_next_update(tmp_path, pki):
    b = bundle_with(tmp_path, pki, {"inter.crl": make_crl(pki.intermediate, days=1)})
    v = ChainVerifier([b])
    now = time.time()
    v.verify(pki.chain(), now)
    assert denied(v, pki.chain(), now + 2 * 86400) is reasons.CERT_REVOCATION_UNKNOWN


def test_a_crl_reloaded_by_the_service_revokes_at_once(write_setup, tmp_path, pki, issuer):
    (tmp_path / "inter.crl").write_bytes(make_crl(pki.intermediate))
    path = write_setup(reload_interval=0.1)
    path.write_text(path.read_text().replace('trust_domain = "example.org"',
                                             'trust_domain = "example.org"\ncrls = ["inter.crl"]', 1))
    token = bound_token(issuer, pki.client)
    doc = {"method": "GET", "path": "/orders", "client_cert": pki.chain_pem(),
           "headers": {"authorization": f"Bearer {token}"}}
    with serve_pdp(load_config(path)) as (url, _):
        assert httpx.post(f"{url}/v1/check", json=doc).json()["allowed"] is True
        (tmp_path / "inter.crl").write_bytes(make_crl(pki.intermediate, (pki.client,)))
        deadline = time.monotonic() + 10
        while httpx.post(f"{url}/v1/check", json=doc).json()["reason"] != "cert_revoked":
            assert time.monotonic() < deadline, "the new CRL did not take effect"
            time.sleep(0.05)


def test_revocation_reaches_the_pipeline_with_its_reason(make_pdp, tmp_path, pki, issuer):
    (tmp_path / "inter.crl").write_bytes(make_crl(pki.intermediate, (pki.client,)))
    pdp = make_pdp(extra="")
    pdp.certificates.replace_bundles([load_bundle(tmp_path / "ca.pem", "example.org", "example.org", "k",
                                                  tmp_path / "intermediates.pem", "i", [tmp_path / "inter.crl"])])
    decision = pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
    assert (decision.allowed, decision.reason, decision.status) == (False, "cert_revoked", 403)
