"""Certificate revocation by CRLs (RFC 5280 §5, §6.3), loaded per trust bundle.

A CRL that names a CA of its bundle must be signed by it (checked at load);
any CRL counts for a certificate only if its issuer's key verifies it. When a chain is verified, every
certificate below the trust anchor is looked up in the CRL of its issuer,
checked against that issuer's key: a listed serial is ``cert_revoked``; a CRL
past its ``nextUpdate`` is ``cert_revocation_unknown`` (fail closed: a stale
list cannot vouch for anyone). A bundle with ``require_crl`` also refuses
certificates whose issuer has no CRL.

CRL files are re-read when they change, like the bundles; verified identities
are cached no longer than the ``nextUpdate`` of the CRLs they were checked
against.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509

from pdp import reasons
from pdp.errors import Denied, LoadError

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.*?-----END X509 CRL-----\s*", re.DOTALL)


CRL = x509.CertificateRevocationList


def load_crls(paths: Iterable[Path], signers: Sequence[x509.Certificate], key: str) -> tuple[CRL, ...]:
    """Read CRLs (PEM, several per file, or DER) and check each is signed by one of ``signers``."""
    crls: list[x509.CertificateRevocationList] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise LoadError(key, f"cannot read CRL {str(path)!r}: {exc.strerror or exc}") from exc
        try:
            blocks = _PEM_CRL.findall(data)
            found = [x509.load_pem_x509_crl(b) for b in blocks] if blocks else [x509.load_der_x509_crl(data)]
        except ValueError as exc:
            raise LoadError(key, f"{str(path)!r} is not a CRL: {exc}") from exc
        for crl in found:
            for ext in (x509.DeltaCRLIndicator, x509.IssuingDistributionPoint):
                try:
                    crl.extensions.get_extension_for_class(ext)
                except x509.ExtensionNotFound:
                    continue
                # A delta or partitioned CRL covers only part of the revocations: used alone, or
                # preferred for being newer, it would hide the rest. Only complete CRLs are accepted.
                raise LoadError(key, f"{str(path)!r}: delta and partitioned CRLs ({ext.__name__}) are not "
                                     "supported; give the complete CRL")
            # A CRL of a bundle CA must carry that CA's signature. A CRL of an intermediate the bundle
            # does not hold is checked against the intermediate a client presents, when it presents it.
            named = [s for s in signers if s.subject == crl.issuer]
            if named and not any(_signed_by(crl, s) for s in named):
                raise LoadError(key, f"CRL in {str(path)!r} names a CA of its trust bundle but is not signed by it")
        crls += found
    return tuple(crls)


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def check_chain(chain: Sequence[x509.Certificate], crls: Sequence[x509.CertificateRevocationList], now: float,
                *, require: bool) -> float:
    """Raise ``Denied`` if a certificate below the anchor is revoked or its status unknown; return the
    earliest ``nextUpdate`` consulted (how long the answer may be cached), or infinity."""
    until = float("inf")
    for cert, issuer in itertools.pairwise(chain):
        candidates = [c for c in crls if c.issuer == cert.issuer and _signed_by(c, issuer)]
        if not candidates:
            if require:
                raise Denied(reasons.CERT_REVOCATION_UNKNOWN,
                             f"no CRL for issuer {cert.issuer.rfc4514_string()} (require_crl)")
            continue
        crl = max(candidates, key=lambda c: c.last_update_utc)
        next_update = crl.next_update_utc.timestamp() if crl.next_update_utc else float("inf")
        if now > next_update:
            raise Denied(reasons.CERT_REVOCATION_UNKNOWN,
                         f"the CRL of {cert.issuer.rfc4514_string()} is past its nextUpdate")
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise Denied(reasons.CERT_REVOKED, f"certificate {format(cert.serial_number, 'x')} is revoked by "
                                               f"{cert.issuer.rfc4514_string()}")
        until = min(until, next_update)
    return until
