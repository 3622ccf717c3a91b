"""Until when a revocation answer speaks: ``thisUpdate`` and ``nextUpdate`` of a CRL (RFC 5280 §5.1.2.4, §5.1.2.5,
§6.3.3) or of an OCSP answer (RFC 6960 §4.2.2.1).

- ``thisUpdate`` may not lie in the future beyond ``LEEWAY`` seconds of clock
  skew (checked where the answer is verified).
- An answer vouches that a certificate is *not* revoked until its
  ``nextUpdate``. One without ``nextUpdate`` ("newer information is always
  available") vouches only briefly: ``undated_ttl`` seconds after it was
  obtained, and never once it is more than ``undated_ttl`` (+ ``LEEWAY``)
  seconds old, so an old undated answer replayed (by a man in the middle of a
  plain-HTTP fetch, a stale mirror, or through the shared store) vouches for
  nothing.
- Staleness only ends an answer's power to vouch for *good*: a certificate it
  lists as revoked stays revoked (RFC 5280 §3.3), except one on
  ``certificateHold``, which the CA may have released since (§5.3.1).
"""

from __future__ import annotations

#: Seconds a CA's or responder's clock may run ahead of ours (``thisUpdate`` in the future), and an undated
#: answer's age may exceed ``undated_ttl``.
LEEWAY = 120.0


def issued_in_future(this_update: float, now: float) -> bool:
    """Whether an answer made at ``this_update`` cannot have been made yet at ``now``, even with clock skew."""
    return this_update > now + LEEWAY


def vouches_until(this_update: float, next_update: float | None, now: float, undated_ttl: float) -> float:
    """Until when an answer (``next_update`` None: undated) obtained at ``now`` vouches that what it does not
    revoke is good; a time before ``now`` when it is stale already."""
    if next_update is not None:
        return next_update
    return min(now + undated_ttl, this_update + undated_ttl + LEEWAY)
