"""Fuzz the whole pipeline: ``Pdp.decide`` on a request with fuzzed method, path, host and headers.

The input is read as lines, each with ``\\n``, ``\\xNN`` and ``\\uNNNN`` escapes: the method, the path,
the host, the scheme, then ``name: value`` headers. The first byte picks the client's certificate
chain (``_harness.World.chains``: valid, expired, untrusted, garbage, none...). In a header value,
``$T<name>`` stands for one of the issuer's tokens and ``$P<method>`` for one of the client's DPoP
proofs; a value ``Bearer $S<claims>`` (or ``DPoP $S…``) carries a token this target signs with the
issuer's key over those claims, so that any claims reach the pipeline as a validly signed token.

``decide`` never fails internally and never allows a request whose certificate, token, binding or
proof is invalid (``_harness.judge``).
"""

from __future__ import annotations

import json
import re
from types import MappingProxyType

import _harness
import atheris

with atheris.instrument_imports(include=["pdp"]):
    from pdp.request import CheckRequest

WORLD = _harness.world()
PDP = _harness.decision_point()
CHAINS = list(WORLD.chains.values())
CHAIN_NAMES = list(WORLD.chains)
HEADER = json.dumps({"alg": "ES256", "typ": "at+jwt", "kid": WORLD.issuer.kid}).encode()
_PLACEHOLDER = re.compile(r"\$([TP])([A-Za-z_]+)")


def _expand(value: str, signed: set[str]) -> str:
    for scheme in ("Bearer $S", "DPoP $S"):
        if value.startswith(scheme):
            token = _harness.sign_jws(HEADER, value[len(scheme):].encode("utf-8", "surrogatepass"),
                                      WORLD.issuer.key)
            signed.add(token)
            return f"{scheme[:-2]}{token}"

    def one(match: re.Match[str]) -> str:
        table = WORLD.tokens if match.group(1) == "T" else WORLD.proofs
        return table.get(match.group(2) if match.group(1) == "T" else f"fuzz-{match.group(2)}", match.group(0))

    return _PLACEHOLDER.sub(one, value)


def request_of(data: bytes) -> tuple[CheckRequest, frozenset[str]]:
    chain = CHAINS[data[0] % len(CHAINS)] if data else ()
    # Any text, lone surrogates included (a JSON escape can make one): decide() must refuse it itself.
    lines = [_harness.unescape(line) for line in data[1:].decode("utf-8", "surrogateescape").split("\n")]
    lines += [""] * (4 - len(lines))
    method, path, host, scheme = lines[:4]
    headers: dict[str, str] = {}
    signed: set[str] = set()
    for line in lines[4:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        value = _expand(value.strip(), signed)
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    request = CheckRequest(method=method, path=path, host=host, scheme=scheme, time=_harness.FUZZ_NOW,
                           headers=MappingProxyType(headers), client_cert_chain=chain, source_address="192.0.2.7")
    return request, frozenset(signed)


def _seed(chain: str, *lines: str) -> bytes:
    return bytes([CHAIN_NAMES.index(chain)]) + "\n".join(lines).encode()


def seeds() -> list[bytes]:
    thumbprint = WORLD.leaves["client"].thumbprint
    claims = {"iss": _harness.ISSUER, "sub": "s", "aud": _harness.AUDIENCE, "client_id": "c", "jti": "j",
              "iat": int(_harness.FUZZ_NOW), "exp": int(_harness.FUZZ_NOW) + 600, "scope": "read write",
              "cnf": {"x5t#S256": thumbprint}}
    host = _harness.HOST
    return [
        _seed("client", "GET", "/orders?id=1", host, "https", "authorization: Bearer $Tclient", "x-trace: 1"),
        _seed("admin", "POST", "/admin/users", host, "https", "authorization: Bearer $Tadmin"),
        _seed("other", "GET", "/orders", host, "https", "authorization: Bearer $Tclient"),
        _seed("none", "GET", "/orders", host, "https", "authorization: DPoP $Tdpop", "dpop: $PGET"),
        _seed("none", "POST", "/orders", host, "https", "authorization: DPoP $Tdpop", "dpop: $PPOST"),
        _seed("client", "GET", "/public/x", host, "https", "authorization: Bearer $Texpired"),
        _seed("expired", "GET", "/healthz", host, "http"),
        _seed("foreign", "GET", "/orders", host, "https", "authorization: Bearer $Tclient"),
        _seed("client", "GET", "/orders", host, "https", f"authorization: Bearer $S{json.dumps(claims)}"),
        _seed("client", "get", "/a/../admin", "API.FUZZ:443", "HTTPS", "authorization: bearer\\t$Tclient",
              "x-pdp-subject: admin"),
        _seed("none", "GET", "/healthz", host, "https", "x-note: \\udce1", "x-\\ud800: 1"),
    ]


def test_one_input(data: bytes) -> None:
    request, signed = request_of(data)
    _harness.judge(request, PDP.decide(request), signed)


if __name__ == "__main__":
    _harness.run(test_one_input, seeds)
