"""Certificate revocation (RFC 5280 §5, §6.3; RFC 6960): CRL files per trust bundle, OCSP, CRL distribution points.

When a chain is verified, every certificate below the trust anchor is checked,
against the issuing CA *of the verified chain* (never a URL or a key from an
unverified certificate). The sources, in this order:

1. **the bundle's CRL files** (``crls``), read at load; a CRL that names a CA of
   its bundle must be signed by it (checked at load), and any CRL counts for a
   certificate only if its issuer's key verifies it;
2. **answers already in this process** from OCSP or a CRL distribution point
   (``pdp.certificates.online_revocation``): free, so always consulted;
3. **the network**, only while no fresh answer is had: the certificate's OCSP
   responders (``ocsp``: small, per-certificate, usually fresher), then its
   CRL distribution points (``crl_distribution_points``); each looked up in
   the shared store first.

A ``revoked`` from any source consulted is ``cert_revoked``, also from a
source past its ``nextUpdate`` (a CRL file, or an answer held in process):
staleness only stops a source vouching that a certificate is *not* revoked,
and a revoked certificate stays revoked (RFC 5280 §3.3). The one exception is
``certificateHold``: a hold the CA may have lifted since, so a stale source's
hold counts as an unknown status, a current source's as revoked. The first
fresh ``good`` ends the search. A certificate *needs* an answer when it names an
OCSP responder or a CRL distribution point that is switched on, when its
issuer has a CRL file, with ``require_crl`` (the issuer must have a CRL file)
or with ``require_revocation``. A certificate that needs an answer and gets
none (a CRL file past its ``nextUpdate``, responders down, slow, lying,
stale…) has its status unknown: ``revocation = "hard"`` (the default) denies
it ``cert_revocation_unknown``; ``"soft"`` lets it through, logged and counted,
and keeps the verified identity only ``retry_after`` seconds so the sources
are soon asked again. Delta and partitioned CRLs, and CRLs with a critical
extension that cannot be processed (§5.2, §5.3), are refused everywhere.

Verified identities are cached no longer than the earliest ``nextUpdate`` of
the answers they were checked against.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from pdp import reasons
from pdp.certificates.crl_distribution import (
    CrlError,
    distribution_point_urls,
    listing,
    on_hold,
    partial_crl,
    read_entries,
    signed_by,
    unsupported_extension,
)
from pdp.certificates.ocsp import ocsp_urls
from pdp.certificates.online_revocation import OnlineRevocation
from pdp.errors import Denied, LoadError

log = logging.getLogger("pdp")

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.*?-----END X509 CRL-----\s*", re.DOTALL)

CRL = x509.CertificateRevocationList

MODES = ("hard", "soft")

_AIA, _CRLDP = ExtensionOID.AUTHORITY_INFORMATION_ACCESS, ExtensionOID.CRL_DISTRIBUTION_POINTS


@dataclass(frozen=True)
class RevocationPolicy:
    """A trust bundle's revocation settings (``[[certificates.trust_bundles]]``, see docs/configuration.md)."""

    #: "hard": a certificate whose status cannot be had is denied; "soft": allowed, logged and counted.
    mode: str = "hard"
    ocsp: bool = True
    crl_distribution_points: bool = True
    #: Every certificate below the anchor must get an answer, even one that names no source.
    require: bool = False
    #: The longest one chain's revocation check waits on the network, all fetches together.
    timeout: float = 2.0
    max_crl_bytes: int = 4 * 1024 * 1024


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
            partial = partial_crl(crl)
            if partial:
                # A delta or partitioned CRL covers only part of the revocations: used alone, or
                # preferred for being newer, it would hide the rest. Only complete CRLs are accepted.
                raise LoadError(key, f"{str(path)!r}: delta and partitioned CRLs ({partial}) are not "
                                     "supported; give the complete CRL")
            try:
                unknown = unsupported_extension(crl)
                if unknown:
                    raise CrlError(f"a critical extension {unknown} that cannot be processed", "unsupported")
                read_entries(crl)
            except (CrlError, ValueError, x509.DuplicateExtension) as exc:
                raise LoadError(key, f"{str(path)!r}: the CRL cannot be used: {exc}") from exc
            # A CRL of a bundle CA must carry that CA's signature. A CRL of an intermediate the bundle
            # does not hold is checked against the intermediate a client presents, when it presents it.
            named = [s for s in signers if s.subject == crl.issuer]
            if named and not any(signed_by(crl, s) for s in named):
                raise LoadError(key, f"CRL in {str(path)!r} names a CA of its trust bundle but is not signed by it")
        crls += found
    return tuple(crls)


def check_chain(chain: Sequence[x509.Certificate], crls: Sequence[x509.CertificateRevocationList], now: float,
                *, require: bool, policy: RevocationPolicy | None = None, online: OnlineRevocation | None = None,
                network: bool = True) -> float:
    """Raise ``Denied`` if a certificate below the anchor of the verified ``chain`` is revoked, or its status
    unknown under a hard policy; return how long the answer may be cached (the earliest ``nextUpdate``
    consulted, ``retry_after`` after a soft failure, or infinity). ``require`` is ``require_crl``. With
    ``network`` False, raise ``NeedsNetwork`` where an answer would have to be fetched."""
    policy = policy or RevocationPolicy()
    if not crls and not require and not policy.require and not any(_names_a_source(c, policy) for c in chain[:-1]):
        return float("inf")  # nothing to consult and nothing required: no certificate needs an answer
    deadline = time.monotonic() + policy.timeout
    until = float("inf")
    for cert, issuer in itertools.pairwise(chain):
        answered, problems = _check_one(cert, issuer, crls, now, require, policy, online, network, deadline)
        if answered is not None:
            until = min(until, answered)
        elif problems:
            detail = (f"revocation status of certificate {format(cert.serial_number, 'x')} of "
                      f"{cert.issuer.rfc4514_string()} unknown: " + "; ".join(problems))
            if policy.mode != "soft":
                raise Denied(reasons.CERT_REVOCATION_UNKNOWN, detail)
            log.warning("revocation: allowed (revocation = \"soft\"): %s", detail)
            if online is not None:
                online.stats.soft_fail()
            until = min(until, now + (online.retry_after if online is not None else 10.0))
    return until


def _names_a_source(cert: x509.Certificate, policy: RevocationPolicy) -> bool:
    """Whether ``cert`` has an extension naming a source ``policy`` consults (AIA for OCSP, CRL
    distribution points): without one, and without CRL files or a requirement, it needs no answer."""
    if not (policy.ocsp or policy.crl_distribution_points):
        return False
    try:
        return any((policy.ocsp and e.oid == _AIA) or (policy.crl_distribution_points and e.oid == _CRLDP)
                   for e in cert.extensions)
    except (ValueError, x509.DuplicateExtension) as exc:  # extensions are parsed on access
        raise _unparseable(exc) from exc


def _unparseable(exc: Exception) -> Denied:
    return Denied(reasons.CERT_MALFORMED, f"unparseable revocation extension: {exc}")


def _check_one(cert: x509.Certificate, issuer: x509.Certificate, crls: Sequence[CRL], now: float, require: bool,
               policy: RevocationPolicy, online: OnlineRevocation | None, network: bool,
               deadline: float) -> tuple[float | None, list[str]]:
    """The time until which ``cert`` is known not revoked; or None and, when it needed an answer, why none came."""
    problems: list[str] = []
    answers: list[float] = []
    needed = policy.require
    candidates = [c for c in crls if c.issuer == cert.issuer and signed_by(c, issuer)]
    if candidates:
        needed = True
        crl = max(candidates, key=lambda c: c.last_update_utc)
        # A CRL file without nextUpdate is current until it is replaced: the operator publishes it.
        next_update = crl.next_update_utc.timestamp() if crl.next_update_utc else float("inf")
        stale = now > next_update
        entry = listing(crl, cert)
        if entry is not None and not (stale and on_hold(entry)):
            raise Denied(reasons.CERT_REVOKED, f"certificate {format(cert.serial_number, 'x')} is revoked by "
                                               f"{cert.issuer.rfc4514_string()}")
        if stale:
            problems.append(f"the CRL of {cert.issuer.rfc4514_string()} is past its nextUpdate")
        else:
            answers.append(next_update)
    elif require:
        needed = True
        problems.append(f"no CRL for issuer {cert.issuer.rfc4514_string()} (require_crl)")
    try:
        # Most certificates name neither: then there is nothing to look for (and no exception to raise).
        consulted = policy.ocsp or policy.crl_distribution_points  # else the extensions are not read at all
        named = {extension.oid for extension in cert.extensions} if consulted else set()
        responders = ocsp_urls(cert) if policy.ocsp and _AIA in named else ()
        points = distribution_point_urls(cert) if policy.crl_distribution_points and _CRLDP in named else ()
    except (ValueError, x509.DuplicateExtension) as exc:  # extensions are parsed on access
        raise _unparseable(exc) from exc
    if responders or points:
        needed = True
        if online is None:
            problems.append("no way to ask the OCSP responders and CRL distribution points it names")
        else:
            for answer in online.cached(cert, issuer, responders, points, now):
                if answer.revoked:
                    raise Denied(reasons.CERT_REVOKED, f"certificate {format(cert.serial_number, 'x')} is revoked "
                                                       f"({answer.source})")
                answers.append(answer.until)
    if answers:
        return min(answers), []
    if not needed:
        return None, []
    if online is not None and (responders or points):
        fetched, more = online.obtain(cert, issuer, responders, points, now, timeout=policy.timeout,
                                      max_crl_bytes=policy.max_crl_bytes, deadline=deadline, network=network)
        if fetched is not None:
            if fetched.revoked:
                raise Denied(reasons.CERT_REVOKED, f"certificate {format(cert.serial_number, 'x')} is revoked "
                                                   f"({fetched.source})")
            return fetched.until, []
        problems += more
    return None, problems or ["it names no OCSP responder or CRL distribution point (require_revocation)"]
