"""Fuzz chain verification and identity extraction on arbitrary DER: ``ChainVerifier.verify``.

The first byte chooses how the rest (``_harness.frame``: a count, then length-prefixed parts) is
read. Even: every part is a certificate as it is. Odd: the first part is a TBSCertificate that this
target signs with the trusted intermediate's key, so that any content, however odd, reaches identity
extraction as a validly signed certificate; the other parts follow it as they are.

Only ``Denied`` may escape; a verified identity has the leaf's RFC 8705 thumbprint and a policy view
that serialises as JSON.
"""

from __future__ import annotations

import json

import _harness
import atheris

with atheris.instrument_imports(include=["pdp"]):
    from pdp.certificates.trust import ChainVerifier, TrustBundle
    from pdp.credentials.rfc8705 import thumbprint
    from pdp.errors import Denied

WORLD = _harness.world()
BUNDLES = [
    TrustBundle(name="example.org", roots=(WORLD.root.cert,), trust_domain="example.org",
                intermediates=(WORLD.intermediate.cert,)),
    TrustBundle(name="unpinned", roots=(WORLD.intermediate.cert,)),
]


def seeds() -> list[bytes]:
    raw = [b"\x00" + _harness.frame(chain) for chain in WORLD.chains.values()]
    signed = [b"\x01" + _harness.frame((leaf.cert.tbs_certificate_bytes, WORLD.intermediate.der))
              for leaf in WORLD.leaves.values()]
    return raw + signed


def test_one_input(data: bytes) -> None:
    if not data:
        return
    parts = _harness.unframe(data[1:])
    signed = data[0] & 1 == 1
    if signed and parts:
        parts[0] = _harness.sign_tbs(parts[0], WORLD.intermediate.key)
    chain = tuple(parts)
    try:
        identity = ChainVerifier(BUNDLES).verify(chain, _harness.FUZZ_NOW)
    except Denied:
        return
    if identity.thumbprint != thumbprint(chain[0]):
        raise _harness.Violation("the identity's thumbprint is not the leaf's")
    json.dumps(identity.policy_view)


if __name__ == "__main__":
    _harness.run(test_one_input, seeds)
