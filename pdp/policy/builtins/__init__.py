"""OPA builtins the embedded engine (regorus) lacks, provided to it as engine extensions.

Each is written to OPA's documented semantics and error messages and tested
against OPA's own conformance cases (``tests/test_opa_builtins.py``,
``tests/data/opa_builtin_cases.yaml``). An error
raised here is an evaluation error, which pdp turns into a deny, as OPA's
strict mode does. A builtin the engine implements itself is replaced only where
its answer differs from OPA's in a way that can allow (``replaces_native``);
``register`` leaves out every other name the engine already knows.

``EXTENSIONS`` lists each builtin with its arity and whether its answer is a
function of its arguments alone; every non-deterministic one is also in
``pdp.policy.decision_cache.NONDETERMINISTIC``. OPA's deprecated builtins
(``any``, ``re_match``, ``net.cidr_overlap``…) exist for Rego v0 policies only
(``v0_only``), as in OPA.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdp.policy.builtins import crypto, deprecated, globs, jwt, jwt_sign, net, strings, uri, x509
from pdp.policy.builtins._types import BuiltinError

__all__ = ["EXTENSIONS", "BuiltinError", "Extension", "native_builtins", "register"]


@dataclass(frozen=True)
class Extension:
    name: str
    nargs: int
    function: Callable[..., Any]
    deterministic: bool = True
    #: Put in place of the engine's own builtin of that name, whose answer differs from OPA's where it
    #: could allow. Every other extension is registered only where the engine lacks the builtin.
    replaces_native: bool = False
    #: Deprecated in OPA, which keeps it for Rego v0 policies only: registered with v0 engines only.
    v0_only: bool = False


EXTENSIONS: tuple[Extension, ...] = (
    Extension("io.jwt.decode", 1, jwt.decode),
    Extension("io.jwt.decode_verify", 2, jwt.decode_verify, deterministic=False),
    *(Extension(name, 2, fn) for name, fn in sorted(jwt.VERIFIERS.items())),
    Extension("crypto.x509.parse_certificates", 1, x509.parse_certificates),
    Extension("crypto.md5", 1, crypto.md5),
    Extension("crypto.sha1", 1, crypto.sha1),
    Extension("crypto.sha256", 1, crypto.sha256),
    Extension("crypto.hmac.md5", 2, crypto.hmac_md5),
    Extension("crypto.hmac.sha1", 2, crypto.hmac_sha1),
    Extension("crypto.hmac.sha256", 2, crypto.hmac_sha256),
    Extension("crypto.hmac.sha512", 2, crypto.hmac_sha512),
    Extension("crypto.hmac.equal", 2, crypto.hmac_equal),
    Extension("net.cidr_merge", 1, net.cidr_merge),
    Extension("net.cidr_contains", 2, net.cidr_contains, replaces_native=True),
    Extension("net.cidr_contains_matches", 2, net.cidr_contains_matches),
    Extension("strings.split_n", 3, strings.split_n),
    Extension("array.flatten", 1, strings.flatten),
    Extension("io.jwt.encode_sign", 3, jwt_sign.encode_sign, deterministic=False),
    Extension("io.jwt.encode_sign_raw", 3, jwt_sign.encode_sign_raw, deterministic=False),
    Extension("regex.globs_match", 2, globs.globs_match),
    Extension("net.cidr_intersects", 2, net.cidr_intersects),
    Extension("uri.parse", 1, uri.parse),
    Extension("uri.is_valid", 1, uri.is_valid),
    # Rego v0 only (deprecated in OPA).
    Extension("any", 1, deprecated.any_, v0_only=True),
    Extension("all", 1, deprecated.all_, v0_only=True),
    Extension("set_diff", 2, deprecated.set_diff, v0_only=True),
    Extension("re_match", 2, deprecated.re_match, v0_only=True),
    Extension("net.cidr_overlap", 2, net.cidr_overlap, v0_only=True),
    Extension("cast_array", 1, deprecated.cast_array, v0_only=True),
    Extension("cast_set", 1, deprecated.cast_set, v0_only=True),
    Extension("cast_string", 1, deprecated.cast_string, v0_only=True),
    Extension("cast_boolean", 1, deprecated.cast_boolean, v0_only=True),
    Extension("cast_null", 1, deprecated.cast_null, v0_only=True),
    Extension("cast_object", 1, deprecated.cast_object, v0_only=True),
)


@functools.cache
def native_builtins() -> frozenset[str]:
    """The builtins the installed regorus implements (``opa.runtime().builtins``)."""
    import regorus

    engine = regorus.Engine()
    engine.add_policy("builtins.rego", "package pdp_builtins\nnames := opa.runtime().builtins\n")
    return frozenset(engine.eval_rule("data.pdp_builtins.names"))


def register(engine: Any, rego_version: str = "v1") -> None:
    """Add every extension the engine lacks to a ``regorus.Engine`` reading ``rego_version``."""
    native = native_builtins()
    for ext in EXTENSIONS:
        if ext.v0_only and rego_version != "v0":
            continue
        if ext.name not in native or ext.replaces_native:
            engine.add_extension(ext.name, ext.nargs, ext.function)
