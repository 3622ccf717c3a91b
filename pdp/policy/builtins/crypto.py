"""OPA's ``crypto.*`` digest and HMAC builtins: ``crypto.sha256`` … ``crypto.hmac.equal``.

Digests are of the string's UTF-8 bytes, written as lowercase hex, as OPA does.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

from pdp.policy.builtins._types import string


def _digest(name: str, algorithm: str) -> Callable[[Any], str]:
    def digest(x: Any) -> str:
        return hashlib.new(algorithm, string(name, 1, x).encode()).hexdigest()
    return digest


def _hmac(name: str, algorithm: str) -> Callable[[Any, Any], str]:
    def mac(x: Any, key: Any) -> str:
        message, secret = string(name, 1, x), string(name, 2, key)
        return hmac.new(secret.encode(), message.encode(), algorithm).hexdigest()
    return mac


def hmac_equal(mac1: Any, mac2: Any) -> bool:
    """Constant-time comparison of two MACs."""
    a, b = string("crypto.hmac.equal", 1, mac1), string("crypto.hmac.equal", 2, mac2)
    return hmac.compare_digest(a.encode(), b.encode())


md5 = _digest("crypto.md5", "md5")
sha1 = _digest("crypto.sha1", "sha1")
sha256 = _digest("crypto.sha256", "sha256")
hmac_md5 = _hmac("crypto.hmac.md5", "md5")
hmac_sha1 = _hmac("crypto.hmac.sha1", "sha1")
hmac_sha256 = _hmac("crypto.hmac.sha256", "sha256")
hmac_sha512 = _hmac("crypto.hmac.sha512", "sha512")
