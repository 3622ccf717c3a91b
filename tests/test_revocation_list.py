"""pdp's own revocation list: values, the local copy, the pipeline's check and the RFC 7662 endpoint."""

from __future__ import annotations

import hashlib
import time

import pytest
from conftest import AUDIENCE, CLIENT_ID, bound_token, check_request
from pdp.adapters.introspection import IntrospectionClient, introspect
from test_opaque_tokens import authorization_server, client_token, make_opaque_pdp, opaque_issuer_toml  # noqa: F401

from pdp import reasons
from pdp.certificates.revocation_list import (
    Revocation,
    RevocationError,
    RevocationList,
    drop_expired,
    normalize,
    read_revocations,
    remove_revocation,
    restore_revocations,
    store_revocation,
)
from pdp.durations import parse_duration
from pdp.store import MemoryStore

ALLOW_ALL = 'package pdp.authz\nimport rego.v1\nresult := {"allowed": true}\n'


def _revoked(pdp, *entries: Revocation) -> None:
    for entry in entries:
        store_revocation(pdp.store, entry)
    version, read = read_revocations(pdp.store)
    pdp.revocations.replace(read, version, time.time())


@pytest.fixture
def allow_all_pdp(make_pdp, tmp_path):
    policy = tmp_path / "allow.rego"
    policy.write_text(ALLOW_ALL)
    return make_pdp(engine="regorus", policy_paths=[str(policy)])


# -- values
def test_a_certificate_is_named_by_its_x5t_s256_or_its_hex_sha256_fingerprint(pki):
    hexprint = hashlib.sha256(pki.client.der).hexdigest()
    colons = ":".join(hexprint[i:i + 2] for i in range(0, 64, 2)).upper()
    assert normalize("cert", hexprint) == normalize("cert", colons) == pki.client.thumbprint
    assert normalize("cert", pki.client.thumbprint) == pki.client.thumbprint


@pytest.mark.parametrize(("kind", "value"), [
    ("cert", "not-a-thumbprint"), ("cert", "A" * 44), ("token", ""), ("token", "x\ny"),
    ("subject", "spiffe://Example.org/x"), ("subject", "spiffe://example.org/a/../b"), ("host", "x"),
])
def test_malformed_values_are_refused(kind, value):
    with pytest.raises(RevocationError):
        normalize(kind, value)


def test_durations_read_as_people_write_them():
    assert [parse_duration(t) for t in ("90", "90s", "15m", "1h", "7d", "2w", "1.5h")] == \
        [90, 90, 900, 3600, 604800, 1209600, 5400]
    for bad in ("", "0", "7 days", "-1h", "1y", "999999w"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_an_entry_survives_the_store_and_a_foreign_one_is_skipped():
    store = MemoryStore()
    entry = Revocation("subject", "spiffe://example.org/x", "left", 100.0, 200.0, "ops")
    store_revocation(store, entry)
    store.map_set("revocations", {"cert:zz": b"{not json", "nonsense": b"{}"})
    version, entries = read_revocations(store)
    assert entries == [entry] and version == 1


# -- the check on the request path
def test_a_revoked_certificate_is_denied_whatever_the_policy(allow_all_pdp, pki):
    pdp = allow_all_pdp
    assert pdp.decide(check_request(chain=pki.chain())).allowed
    _revoked(pdp, Revocation("cert", pki.client.thumbprint, "key leaked", time.time()))
    decision = pdp.decide(check_request(chain=pki.chain()))
    assert (decision.allowed, decision.reason, decision.status) == (False, "cert_revoked", 403)
    assert "www-authenticate" not in decision.response_headers
    assert [s.name for s in decision.steps if not s.ok] == ["identity", "decision"]
    assert pdp.decide(check_request(chain=pki.chain(pki.other))).allowed  # only that certificate


def test_a_revoked_spiffe_id_denies_every_certificate_and_token_of_that_subject(allow_all_pdp, pki, issuer):
    pdp = allow_all_pdp
    _revoked(pdp, Revocation("subject", CLIENT_ID, created=time.time()))
    decision = pdp.decide(check_request(chain=pki.chain()))
    assert (decision.allowed, decision.reason, decision.status) == (False, "subject_revoked", 403)
    token = bound_token(issuer, pki.other, subject=CLIENT_ID)
    by_sub = pdp.decide(check_request(chain=pki.chain(pki.other), token=token))
    assert (by_sub.allowed, by_sub.reason, by_sub.status) == (False, "subject_revoked", 403)
    assert pdp.decide(check_request(chain=pki.chain(pki.other), token=bound_token(issuer, pki.other))).allowed


def test_a_revoked_token_is_denied_401_with_an_invalid_token_challenge(allow_all_pdp, pki, issuer):
    pdp = allow_all_pdp
    token = bound_token(issuer, pki.client)
    assert pdp.decide(check_request(chain=pki.chain(), token=token)).allowed
    jti = pdp.tokens.verify(token, time.time()).jti
    assert jti is not None
    _revoked(pdp, Revocation("token", jti, created=time.time()))
    decision = pdp.decide(check_request(chain=pki.chain(), token=token))
    assert (decision.allowed, decision.reason, decision.status) == (False, "token_revoked", 401)
    assert 'error="invalid_token"' in decision.response_headers["www-authenticate"]
    assert pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client))).allowed


def test_an_expired_revocation_is_no_longer_enforced(allow_all_pdp, pki):
    pdp = allow_all_pdp
    now = time.time()
    _revoked(pdp, Revocation("cert", pki.client.thumbprint, created=now, expires=now + 0.3))
    assert pdp.decide(check_request(chain=pki.chain(), now=now)).reason == "cert_revoked"
    assert pdp.decide(check_request(chain=pki.chain(), now=now + 0.5)).allowed
    assert pdp.revocations.entries(now + 0.5) == []


def test_a_list_never_loaded_denies_credentials_and_leaves_the_rest_to_the_policy(allow_all_pdp, pki, issuer):
    pdp = allow_all_pdp
    pdp.revocations = RevocationList.not_loaded()
    for request in (check_request(chain=pki.chain()),
                    check_request(token=bound_token(issuer, pki.client))):
        decision = pdp.decide(request)
        assert (decision.allowed, decision.reason, decision.status) == (False, "store_unavailable", 503)
    assert pdp.decide(check_request()).allowed  # nothing presented: nothing that could be revoked


def test_the_new_reasons_are_declared_like_their_neighbours():
    assert reasons.by_code("token_revoked") is reasons.TOKEN_REVOKED
    assert (reasons.TOKEN_REVOKED.status, reasons.TOKEN_REVOKED.oauth_error, reasons.TOKEN_REVOKED.challenge) == \
        (401, "invalid_token", True)
    assert (reasons.SUBJECT_REVOKED.status, reasons.SUBJECT_REVOKED.challenge) == (403, False)


def test_the_check_costs_a_lookup_per_kind(allow_all_pdp, pki):
    """With 100,000 entries on the list, checking one identity stays in the microseconds."""
    pdp = allow_all_pdp
    now = time.time()
    entries = [Revocation("cert", f"{i:043d}", created=now) for i in range(50_000)]
    entries += [Revocation("subject", f"spiffe://example.org/gone/{i}", created=now) for i in range(50_000)]
    pdp.revocations.replace(entries, 1, now)
    identity = pdp.certificates.verify(pki.chain(), now)
    started = time.perf_counter()
    for _ in range(10_000):
        pdp.revocations.check_identity(identity, now)
    per_check = (time.perf_counter() - started) / 10_000
    assert per_check < 20e-6  # measured ~0.3 µs; a generous bound for a loaded machine


# -- RFC 7662
def test_a_revoked_token_is_inactive_at_the_introspection_endpoint(allow_all_pdp, pki, issuer):
    pdp = allow_all_pdp
    client = IntrospectionClient("rs", audiences=frozenset([AUDIENCE]))
    token = bound_token(issuer, pki.client)
    assert introspect(pdp, token, client)["active"] is True
    jti = pdp.tokens.verify(token, time.time()).jti
    assert jti is not None
    _revoked(pdp, Revocation("token", jti, created=time.time()))
    assert introspect(pdp, token, client) == {"active": False}
    assert remove_revocation(pdp.store, "token", jti)
    version, entries = read_revocations(pdp.store)
    pdp.revocations.replace(entries, version, time.time())
    assert introspect(pdp, token, client)["active"] is True
    pdp.revocations = RevocationList.not_loaded()
    assert introspect(pdp, token, client) == {"active": False}


def test_an_opaque_token_is_revoked_by_the_sub_its_introspection_answer_carries(
        make_opaque_pdp, tmp_path, pki, authorization_server):  # noqa: F811
    _, running = authorization_server
    pdp = make_opaque_pdp(opaque_issuer_toml(running, tmp_path))
    token = client_token(running, pki, tmp_path)
    assert pdp.decide(check_request(chain=pki.chain(), token=token)).allowed
    _revoked(pdp, Revocation("subject", "demo-client", created=time.time()))  # the answer's sub
    decision = pdp.decide(check_request(chain=pki.chain(), token=token))
    assert (decision.allowed, decision.reason) == (False, "subject_revoked")


# -- values that would never match, reasons that would forge a line
def test_a_non_canonical_thumbprint_is_kept_in_the_one_spelling_that_matches(pki):
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    canonical = pki.client.thumbprint
    low = alphabet.index(canonical[-1]) & ~3  # the last character: 4 bits of the digest, 2 spare ones
    for spare in range(4):
        assert normalize("cert", canonical[:-1] + alphabet[low + spare]) == canonical


def test_a_whole_jwt_is_refused_as_a_token_value_naming_its_jti_or_the_subject_to_revoke(issuer, pki):
    token = bound_token(issuer, pki.client)
    with pytest.raises(RevocationError, match=r"its jti claim is '[0-9a-f]{32}'"):
        normalize("token", token)
    without = issuer.mint(bound_to=pki.client, extra={"jti": None})
    with pytest.raises(RevocationError, match="revoke subject"):
        normalize("token", without)
    assert normalize("token", "a.b.c") == "a.b.c"  # a jti with dots is still a jti


@pytest.mark.parametrize("reason", ["line\nforged", "bell\x07", "esc\x1b[2K", "\ud800", "r" * 513, "tab\there"])
def test_a_reason_that_is_not_one_line_of_printable_text_is_refused_and_nothing_stored(reason):
    store = MemoryStore()
    with pytest.raises(RevocationError):
        store_revocation(store, Revocation("token", "j1", reason, time.time()))
    assert store.map_items("revocations") == {}


def test_a_stored_reason_with_control_characters_is_shown_harmlessly():
    store = MemoryStore()
    store.map_set("revocations", {"token:j1": b'{"reason": "a\\nb\\ud800", "by": "\\u001b[2K"}'})
    (entry,) = read_revocations(store)[1]
    assert entry.reason.isprintable() and entry.by.isprintable() and entry.reason.startswith("a")


@pytest.mark.parametrize("first, second", [(None, 60.0), (600.0, 60.0), (60.0, None), (60.0, 600.0)])
def test_re_revoking_keeps_the_later_expiry_and_permanent_wins(first, second):
    store = MemoryStore()
    now = time.time()
    store_revocation(store, Revocation("token", "j1", "first", now, now + first if first else None))
    stored = store_revocation(store, Revocation("token", "j1", "second", now, now + second if second else None))
    (entry,) = read_revocations(store)[1]
    later = None if first is None or second is None else now + max(first, second)
    assert entry.expires == later == stored.expires and entry.reason == "second"


def test_an_expired_entry_is_replaced_whatever_its_expiry():
    store = MemoryStore()
    now = time.time()
    store_revocation(store, Revocation("token", "j1", "old", now - 100, now - 50))
    store_revocation(store, Revocation("token", "j1", "new", now, now + 10))
    assert read_revocations(store)[1][0].expires == now + 10


@pytest.mark.parametrize("value", [b'{"expires": 1e400}', b'{"created": -1e400}', b'{"expires": NaN}',
                                   b'{"expires": ' + b"9" * 400 + b"}", b'{"expires": true}', b'{"created": "1"}',
                                   b'{"expires": 1e300}', b"[" * 100_000, b"\xff", b"{}{}"])
def test_an_entry_with_a_value_no_time_holds_is_skipped_and_logged_once(value, caplog):
    store = MemoryStore()
    store.map_set("revocations", {"token:bad": value, "token:good": Revocation("token", "good").encode()})
    for _ in range(3):
        assert [e.value for e in read_revocations(store)[1]] == ["good"]
    assert sum("token:bad" in r.getMessage() for r in caplog.records) == 1


def test_the_expiry_sweep_deletes_only_what_it_read():
    store = MemoryStore()
    now = time.time()
    store_revocation(store, Revocation("token", "j1", "old", now - 10, now - 1))
    store_revocation(store, Revocation("token", "j2", "old", now - 10, now - 1))
    _, entries = read_revocations(store)
    store.map_set("revocations", {"token:j1": Revocation("token", "j1", "renewed", now).encode()})
    assert drop_expired(store, entries, now) == 1
    assert [(e.value, e.reason) for e in read_revocations(store)[1]] == [("j1", "renewed")]


def test_a_token_bound_to_a_revoked_certificate_is_denied_and_inactive_at_introspection(allow_all_pdp, pki, issuer):
    token = bound_token(issuer, pki.client)
    _revoked(allow_all_pdp, Revocation("cert", pki.client.thumbprint, created=time.time()))
    # Presented with another certificate (pki.other): the token's own binding names the revoked one.
    decision = allow_all_pdp.decide(check_request(chain=pki.chain(pki.other), token=token))
    assert (decision.allowed, decision.reason) == (False, "cert_revoked")
    client = IntrospectionClient(CLIENT_ID, audiences=frozenset({AUDIENCE}))
    assert introspect(allow_all_pdp, token, client) == {"active": False}


def test_a_caller_is_refused_by_its_thumbprint_or_its_spiffe_id(pki):
    revocations = RevocationList(now=time.time())
    now = time.time()
    assert revocations.caller_revocation(pki.client.der, now) is None
    revocations.replace([Revocation("cert", pki.client.thumbprint)], 1, now)
    assert revocations.caller_revocation(pki.client.der, now) is reasons.CERT_REVOKED
    assert revocations.caller_revocation(pki.other.der, now) is None
    assert revocations.caller_revocation(None, now) is None
    revocations.replace([Revocation("subject", "spiffe://example.org/demo/other")], 2, now)
    assert revocations.caller_revocation(pki.other.der, now) is reasons.SUBJECT_REVOKED
    assert RevocationList.not_loaded().caller_revocation(pki.client.der, now) is None  # nothing read to enforce


def test_write_back_restores_only_what_the_store_lacks():
    store = MemoryStore()
    now = time.time()
    store_revocation(store, Revocation("token", "kept", "in the store", now))
    held = [Revocation("token", "kept", "held", now), Revocation("token", "lost", "held", now),
            Revocation("token", "over", "held", now - 10, now - 1)]
    assert restore_revocations(store, held, now) == 1
    assert sorted((e.value, e.reason) for e in read_revocations(store)[1]) == [("kept", "in the store"),
                                                                               ("lost", "held")]
