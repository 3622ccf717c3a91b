"""``policy.opa.client_cert`` and ``client_key``: pdp's certificate for an OPA run with ``--authentication=tls``.

The OPA stand-in of ``test_opa_remote`` serves https here and requires a client certificate issued by a
CA of its own (``ssl`` with ``CERT_REQUIRED``), as OPA does with ``--authentication=tls`` and
``--tls-ca-cert-file``. Certificates and keys are made on the fly with ``cryptography``.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from test_opa_remote import OpaStandIn, decide, opa_config

from pdp.assemble import build_pdp
from pdp.config import load_config
from pdp.devpki import Issued, make_ca, make_client
from pdp.errors import ConfigError

pytestmark = pytest.mark.integration


@dataclass
class OpaPki:
    folder: Path
    server_ca: Issued
    client_ca: Issued
    client: Issued


@pytest.fixture
def opa_pki(tmp_path: Path) -> OpaPki:
    """opa-ca.pem (signs OPA's certificate), pdp.pem and pdp.key (signed by the CA OPA trusts for clients),
    other.pem and other.key (signed by another CA), opa.pem (OPA's certificate and key)."""
    server_ca, client_ca, other_ca = make_ca("opa server CA"), make_ca("opa client CA"), make_ca("another CA")
    server = make_client(server_ca, spiffe_id=None, common_name="opa", dns=("localhost",), ips=("127.0.0.1",),
                         client_auth=False)
    client = make_client(client_ca, spiffe_id="spiffe://example.org/pdp", common_name="pdp")
    other = make_client(other_ca, spiffe_id="spiffe://example.org/pdp", common_name="pdp")
    files = {"opa-ca.pem": server_ca.pem, "opa.pem": server.pem + server.key_pem, "clients-ca.pem": client_ca.pem,
             "pdp.pem": client.pem, "pdp.key": client.key_pem, "other.pem": other.pem, "other.key": other.key_pem}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return OpaPki(tmp_path, server_ca, client_ca, client)


@pytest.fixture
def mtls_opa(opa_pki: OpaPki) -> Iterator[OpaStandIn]:
    """The stand-in on https, refusing every connection without a certificate of ``clients-ca.pem``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(opa_pki.folder / "opa.pem")
    context.load_verify_locations(opa_pki.folder / "clients-ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    with OpaStandIn(tls=context) as server:
        yield server


def mtls_config(write_setup: Any, url: str, more: str = "") -> Path:
    return opa_config(write_setup, url, more=f'ca = "opa-ca.pem"\n{more}')


PAIR = 'client_cert = "pdp.pem"\nclient_key = "pdp.key"\n'


def test_with_the_client_certificate_opa_answers(write_setup, mtls_opa):
    pdp = build_pdp(load_config(mtls_config(write_setup, mtls_opa.url, PAIR)))
    try:
        allowed, denied = decide(pdp, "GET"), decide(pdp, "DELETE")
    finally:
        pdp.close()
    assert (allowed.allowed, allowed.reason) == (True, "allowed")
    assert (denied.allowed, denied.reason) == (False, "policy_denied")
    peer = mtls_opa.peers[0]
    assert peer is not None and ("URI", "spiffe://example.org/pdp") in peer["subjectAltName"]


def test_without_a_client_certificate_opa_refuses_and_the_decision_is_policy_unavailable(write_setup, mtls_opa):
    pdp = build_pdp(load_config(mtls_config(write_setup, mtls_opa.url)))
    try:
        decision = decide(pdp)
    finally:
        pdp.close()
    assert (decision.allowed, decision.reason, decision.status) == (False, "policy_unavailable", 503)
    assert mtls_opa.asked == []


def test_a_certificate_of_another_ca_is_refused_and_the_decision_is_policy_unavailable(write_setup, mtls_opa):
    pdp = build_pdp(load_config(mtls_config(write_setup, mtls_opa.url,
                                            'client_cert = "other.pem"\nclient_key = "other.key"\n')))
    try:
        decision = decide(pdp)
    finally:
        pdp.close()
    assert (decision.allowed, decision.reason) == (False, "policy_unavailable")
    assert mtls_opa.asked == []


def test_every_connection_of_the_pool_presents_the_certificate(write_setup, mtls_opa):
    mtls_opa.delay = 0.02  # the decisions overlap: several connections are opened
    pdp = build_pdp(load_config(mtls_config(write_setup, mtls_opa.url, f"{PAIR}max_connections = 4\n")))
    try:
        with ThreadPoolExecutor(8) as pool:
            reasons = list(pool.map(lambda _: decide(pdp).reason, range(40)))
    finally:
        pdp.close()
    assert reasons == ["allowed"] * 40
    assert 1 < mtls_opa.connections <= 4
    assert len(mtls_opa.peers) == mtls_opa.connections and all(mtls_opa.peers)


# -- configuration: both or neither, https only, files that load

@pytest.mark.parametrize(("more", "key"), [
    ('client_cert = "pdp.pem"\n', "policy.opa.client_key"),
    ('client_key = "pdp.key"\n', "policy.opa.client_cert"),
])
def test_a_certificate_without_its_key_or_a_key_without_its_certificate_is_refused(write_setup, opa_pki, more, key):
    with pytest.raises(ConfigError) as raised:
        load_config(mtls_config(write_setup, "https://127.0.0.1:8181", more))
    assert raised.value.key == key and "both or neither" in str(raised.value)


def test_a_client_certificate_over_plain_http_is_refused(write_setup, opa_pki):
    with pytest.raises(ConfigError) as raised:
        load_config(opa_config(write_setup, "http://127.0.0.1:8181", more=PAIR))
    assert raised.value.key == "policy.opa.client_cert" and "https://" in str(raised.value)


def _encrypted(pki: OpaPki) -> bytes:
    return pki.client.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.BestAvailableEncryption(b"pass phrase"))


@pytest.mark.parametrize(("files", "key", "named", "says"), [
    ({"client_cert": "missing.pem"}, "policy.opa.client_cert", "missing.pem", "cannot read"),
    ({"client_key": "missing.key"}, "policy.opa.client_key", "missing.key", "cannot read"),
    ({"client_cert": "garbage.pem"}, "policy.opa.client_cert", "garbage.pem", "no PEM certificate"),
    ({"client_key": "garbage.pem"}, "policy.opa.client_key", "garbage.pem", "no PEM private key"),
    ({"client_key": "other.key"}, "policy.opa.client_key", "other.key", "is not the key of the certificate"),
    ({"client_key": "encrypted.key"}, "policy.opa.client_key", "encrypted.key", "encrypted key"),
])
def test_a_client_pair_that_does_not_load_is_a_start_up_error_naming_the_key_and_file(
        write_setup, opa_pki, files, key, named, says):
    (opa_pki.folder / "garbage.pem").write_text("not PEM\n")
    (opa_pki.folder / "encrypted.key").write_bytes(_encrypted(opa_pki))
    pair = {"client_cert": "pdp.pem", "client_key": "pdp.key", **files}
    more = "".join(f'{name} = "{value}"\n' for name, value in pair.items())
    config = load_config(mtls_config(write_setup, "https://127.0.0.1:8181", more))
    with pytest.raises(ConfigError) as raised:
        build_pdp(config)
    assert raised.value.key == key
    assert named in str(raised.value) and says in str(raised.value)


def test_the_certificate_and_key_in_one_file_are_accepted(write_setup, opa_pki, mtls_opa):
    (opa_pki.folder / "pdp-both.pem").write_bytes(opa_pki.client.pem + opa_pki.client.key_pem)
    pdp = build_pdp(load_config(mtls_config(write_setup, mtls_opa.url,
                                            'client_cert = "pdp-both.pem"\nclient_key = "pdp-both.pem"\n')))
    try:
        assert decide(pdp).allowed is True
    finally:
        pdp.close()


def test_a_renewed_client_certificate_is_presented_after_a_reload(write_setup, opa_pki, mtls_opa):
    """Certificates are short-lived: a renewed pdp.pem/pdp.key is a new remote engine at the next reload."""
    import httpx
    from servers import serve_pdp

    config = load_config(mtls_config(write_setup, mtls_opa.url, PAIR))
    renewed = make_client(opa_pki.client_ca, spiffe_id="spiffe://example.org/pdp-renewed", common_name="pdp")
    with serve_pdp(config) as (url, service):
        httpx.post(f"{url}/v1/check", json={"method": "GET", "path": "/orders"}, timeout=10)
        for name, data in (("pdp.pem", renewed.pem), ("pdp.key", renewed.key_pem)):
            (opa_pki.folder / name).write_bytes(data)
            os.utime(opa_pki.folder / name, (time.time() + 5, time.time() + 5))  # seen as changed, whatever the clock
        service.reloader.check()  # as the watching thread does: only parts whose files changed
        httpx.post(f"{url}/v1/check", json={"method": "GET", "path": "/orders"}, timeout=10)
    names = [dict(peer["subjectAltName"]).get("URI") for peer in mtls_opa.peers if peer is not None]
    assert names[0] == "spiffe://example.org/pdp" and names[-1] == "spiffe://example.org/pdp-renewed"
