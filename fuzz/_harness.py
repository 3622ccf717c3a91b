"""What every fuzz target shares: a fixed world of keys, certificates and tokens, and the runner.

The keys are derived from fixed labels and every check is made at ``FUZZ_NOW``, so that an input
saved by one run (a corpus entry, a crash file holding a token, a proof or a certificate of that run)
still verifies in the next process. These keys sign nothing but fuzz inputs.

This module imports no part of pdp at import time: a target imports the code under test inside
``atheris.instrument_imports()`` first, so that pdp is instrumented for coverage, and only then
builds the world.
"""

from __future__ import annotations

import base64
import codecs
import functools
import hashlib
import json
import os
import sys
import tempfile
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import atheris

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from pdp.decision import Decision
    from pdp.devpki import DpopKey, Issued, TokenIssuer
    from pdp.pipeline import Pdp
    from pdp.request import CheckRequest

#: The time every check is made at (2026-01-01T00:00:00Z).
FUZZ_NOW = 1_767_225_600.0
ISSUER = "https://issuer.fuzz"
AUDIENCE = "https://api.fuzz"
HOST = "api.fuzz"
PROXY = "127.0.0.1"
DPOP_URL = f"https://{HOST}/orders"
XFCC_BY = "spiffe://example.org/ns/edge/sa/envoy"
LEEWAY = 30.0

REPO = Path(__file__).resolve().parents[1]


# -- input helpers

def text(data: bytes) -> str:
    """Bytes as a header would carry them: UTF-8 when they are, otherwise one character per byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def unescape(line: str) -> str:
    """``\\n``, ``\\xNN``, ``\\uNNNN`` escapes in a line, so a line-based input can hold any character."""
    if "\\" not in line:
        return line
    try:
        return codecs.decode(line.encode("latin-1", "backslashreplace"), "unicode_escape")
    except (UnicodeDecodeError, ValueError):
        return line


def frame(parts: Iterable[bytes]) -> bytes:
    """Several byte strings in one input: a count byte, then each part after a two-byte length."""
    items = list(parts)
    return bytes([len(items)]) + b"".join(len(p).to_bytes(2, "big") + p for p in items)


def unframe(data: bytes, limit: int = 12) -> list[bytes]:
    """The parts of ``frame``; a short or overlong input gives what it holds, the last part the rest."""
    if not data:
        return []
    count, pos, parts = min(data[0], limit), 1, []
    for i in range(count):
        if i == count - 1 or pos + 2 > len(data):
            parts.append(data[pos + 2:] if pos + 2 <= len(data) else b"")
            break
        size = int.from_bytes(data[pos:pos + 2], "big")
        parts.append(data[pos + 2:pos + 2 + size])
        pos += 2 + size
    return parts


# -- deterministic keys and signatures

def ec_key(label: str, curve: str = "P-256") -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    curves: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}
    order = {"P-256": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
             "P-384": int("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
                          "581a0db248b0a77aecec196accc52973", 16)}[curve]
    secret = int.from_bytes(hashlib.sha512(f"pdp fuzz key {label}".encode()).digest(), "big") % (order - 1) + 1
    return ec.derive_private_key(secret, curves[curve])


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def claims_of(token: str) -> dict[str, Any] | None:
    """The payload of a compact JWS as JSON, unverified; None when it is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None


def sign_jws(header: bytes, payload: bytes, key: ec.EllipticCurvePrivateKey) -> str:
    """A compact ES256/ES384 JWS over exactly these header and payload bytes."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    signing_input = f"{b64url(header)}.{b64url(payload)}"
    size = (key.curve.key_size + 7) // 8
    digest = hashes.SHA256() if size == 32 else hashes.SHA384()
    r, s = decode_dss_signature(key.sign(signing_input.encode("ascii"), ec.ECDSA(digest)))
    return f"{signing_input}.{b64url(r.to_bytes(size, 'big') + s.to_bytes(size, 'big'))}"


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
        (n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + content


#: AlgorithmIdentifier ecdsa-with-SHA256 (1.2.840.10045.4.3.2), no parameters.
_ECDSA_SHA256 = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d040302")))


def sign_tbs(tbs: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A certificate whose TBSCertificate is exactly ``tbs`` (any bytes), signed by ``key``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _der(0x30, tbs + _ECDSA_SHA256 + _der(0x03, b"\x00" + signature))


# -- certificate headers

def check_chain(chain: tuple[bytes, ...] | None, what: str) -> None:
    """What every certificate-header parser promises about a chain it returns."""
    if not isinstance(chain, tuple) or not chain:
        raise Violation(f"{what} returned {type(chain).__name__} {chain!r:.80}, not a non-empty chain")
    if not all(isinstance(der, bytes) and der for der in chain):
        raise Violation(f"{what} returned an empty or non-bytes certificate")


def read_header(fmt: str, headers: Mapping[str, str], parse: Callable[[], tuple[bytes, ...]]) -> None:
    """``CertificateHeaders.read`` for ``fmt``: from a trusted proxy it gives exactly what the bare
    parser gives (a chain, or an error where the parser raised), from anyone else nothing."""
    from pdp.adapters.cert_headers import CertHeaderError, CertificateHeaders

    reader = CertificateHeaders(fmt, [PROXY, "10.0.0.0/8"], xfcc_by=XFCC_BY if fmt == "xfcc" else None)
    try:
        expected: tuple[bytes, ...] | None = parse()
    except CertHeaderError:
        expected = None
    got = reader.read(PROXY, headers)
    if (got.chain or None) != expected or (expected is None) != (got.error is not None) or got.untrusted:
        raise Violation(f"CertificateHeaders({fmt!r}).read from a trusted proxy gave {got!r:.200}")
    ignored = reader.read("192.0.2.1", headers)
    if ignored.chain or ignored.error or not ignored.untrusted:
        raise Violation(f"CertificateHeaders({fmt!r}).read believed an untrusted peer: {ignored!r:.200}")


def pem_seeds() -> list[bytes]:
    """PEM texts of real chains, as the header formats start from."""
    w = world()
    return [w.leaves["client"].pem, w.leaves["client"].pem + w.intermediate.pem,
            w.leaves["other"].pem + w.intermediate.pem + w.root.pem]


# -- the world: a PKI, an issuer, a DPoP key and a Pdp configured to trust them

@dataclass
class World:
    root: Issued
    intermediate: Issued
    leaves: dict[str, Issued]
    #: chains by name: valid ones (client, client_leaf, other, admin, none) and invalid ones
    chains: dict[str, tuple[bytes, ...]]
    issuer: TokenIssuer
    other_issuer: TokenIssuer
    dpop_key: DpopKey
    #: tokens by name, each with the ``jti`` ``fuzz-<name>``
    tokens: dict[str, str]
    #: the ``jti`` of each token that is valid when presented as it was meant to be
    valid_jtis: frozenset[str]
    #: DPoP proofs by ``jti`` (``fuzz-<method>``), for the ``dpop`` token, all naming ``DPOP_URL``
    proofs: dict[str, str]
    nonce_secret: bytes

    @property
    def valid_leaves(self) -> dict[bytes, str]:
        return {self.leaves[n].der: n for n in ("client", "other", "admin")}


_CONFIG = f"""
[policy]
engine = "regorus"

[[certificates.trust_bundles]]
name = "example.org"
file = "ca.pem"
intermediates = "intermediates.pem"
trust_domain = "example.org"

[tokens]
require_bound = true

[[tokens.issuers]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
algorithms = ["ES256", "ES384", "EdDSA"]
jwks_file = "jwks.json"

[log]
decisions = false
"""


@functools.cache
def decision_point() -> Pdp:
    """A Pdp for ``world()``, built as ``pdp serve`` builds one from its config file, with the shipped policy."""
    from pdp.assemble import build_pdp
    from pdp.config import load_config

    w = world()
    with tempfile.TemporaryDirectory(prefix="pdp-fuzz-") as tmp:
        folder = Path(tmp)
        (folder / "ca.pem").write_bytes(w.root.pem)
        (folder / "intermediates.pem").write_bytes(w.intermediate.pem)
        (folder / "jwks.json").write_text(json.dumps(w.issuer.jwks))
        (folder / "pdp.toml").write_text(_CONFIG)
        return build_pdp(load_config(folder / "pdp.toml"), probe=False)


@functools.cache
def world() -> World:
    from pdp.devpki import DpopKey, TokenIssuer, make_ca, make_client

    start = datetime.fromtimestamp(FUZZ_NOW, UTC) - timedelta(days=1)
    root = make_ca("fuzz root", key=ec_key("root"), not_before=start)
    inter = make_ca("fuzz intermediate", key=ec_key("intermediate"), issuer=root, path_length=0, not_before=start)
    foreign = make_ca("fuzz foreign root", key=ec_key("foreign"), not_before=start)
    leaves = {
        "client": make_client(inter, spiffe_id="spiffe://example.org/demo/client", key=ec_key("client"),
                              not_before=start),
        "other": make_client(inter, spiffe_id="spiffe://example.org/demo/other", key=ec_key("other"),
                             not_before=start),
        "admin": make_client(inter, spiffe_id="spiffe://example.org/admin/ops", key=ec_key("admin"),
                             not_before=start),
        "expired": make_client(inter, key=ec_key("expired"), not_before=start - timedelta(days=10), days=1),
        "foreign": make_client(foreign, key=ec_key("foreign client"), not_before=start),
        "server": make_client(inter, key=ec_key("server"), not_before=start, client_auth=False),
        "other_domain": make_client(inter, spiffe_id="spiffe://elsewhere.org/x", key=ec_key("elsewhere"),
                                    not_before=start),
    }
    chains = {
        "none": (),
        "client": (leaves["client"].der, inter.der),
        "client_leaf": (leaves["client"].der,),
        "other": (leaves["other"].der, inter.der),
        "admin": (leaves["admin"].der, inter.der),
        "expired": (leaves["expired"].der, inter.der),
        "foreign": (leaves["foreign"].der, foreign.der),
        "server": (leaves["server"].der, inter.der),
        "other_domain": (leaves["other_domain"].der, inter.der),
        "intermediate": (inter.der,),
        "root": (root.der,),
        "garbage": (b"\x30\x03\x02\x01\x00",),
    }

    issuer = TokenIssuer(ISSUER, ec_key("issuer"), "k1")
    other_issuer = TokenIssuer(ISSUER, ec_key("impostor"), "k1")
    dpop_key = DpopKey(ec_key("dpop"))
    iat = int(FUZZ_NOW) - 60

    specs: dict[str, dict[str, Any]] = {
        "client": {"bound_to": leaves["client"]},
        "admin": {"bound_to": leaves["admin"], "scope": "admin read write"},
        "unbound": {},
        "dpop": {"dpop_key": dpop_key},
        "expired": {"bound_to": leaves["client"], "now": iat - 7200},
        "future": {"bound_to": leaves["client"], "now": iat + 7200},
        "wrong_audience": {"bound_to": leaves["client"], "audience": "https://elsewhere.fuzz"},
        "impostor": {"bound_to": leaves["client"], "token_issuer": other_issuer},
        "plain_jwt": {"bound_to": leaves["client"], "typ": "JWT"},
        "no_sub": {"bound_to": leaves["client"], "extra": {"sub": None}},
    }
    tokens = {}
    for name, spec in specs.items():
        kw = {"audience": AUDIENCE, "scope": "read write", "now": iat, "lifetime": 3600, **spec}
        kw["extra"] = {"jti": f"fuzz-{name}", **kw.get("extra", {})}  # the same claims in every process
        tokens[name] = kw.pop("token_issuer", issuer).mint(**kw)
    proofs = {f"fuzz-{m}": dpop_key.proof(m, DPOP_URL, tokens["dpop"], iat=FUZZ_NOW, jti=f"fuzz-{m}")
              for m in ("GET", "POST")}

    nonce_secret = hashlib.sha256(b"pdp fuzz nonce secret").digest()
    return World(root=root, intermediate=inter, leaves=leaves, chains=chains,
                 issuer=issuer, other_issuer=other_issuer, dpop_key=dpop_key, tokens=tokens,
                 valid_jtis=frozenset(f"fuzz-{n}" for n in ("client", "admin", "unbound", "dpop")), proofs=proofs,
                 nonce_secret=nonce_secret)


# -- what a decision may never be

class Violation(AssertionError):
    """A decision broke one of pdp's promises on a fuzzed request."""


def decide(pdp: Pdp, raw: Any) -> tuple[CheckRequest | None, Decision]:
    """What an adapter's result is decided as: a ``RawRequest`` through the one reader
    (``Pdp.check``), a ``CheckRequest`` as it is; with the ``CheckRequest`` read (None if refused)."""
    from pdp.errors import Denied
    from pdp.request import CheckRequest

    if isinstance(raw, CheckRequest):
        return raw, pdp.decide(raw)
    try:
        request: CheckRequest | None = pdp.reader.read(raw)
    except Denied:
        request = None
    decision = pdp.check(raw)
    if request is None and decision.allowed:
        raise Violation(f"allowed a request the reader refuses: {raw!r:.300}")
    return request, decision


def judge(request: CheckRequest, decision: Decision, signed: frozenset[str] = frozenset()) -> None:
    """Raise ``Violation`` when ``decision`` failed internally or allowed an invalid credential.

    A token is judged by its claims (RFC 9068, RFC 8705, RFC 9449), read here independently of pdp; it
    must also be one the issuer minted as valid (by its ``jti``) or be in ``signed``, the tokens the
    target signed itself with the issuer's key over fuzzed claims."""
    if decision.reason == "internal_error":
        raise Violation(f"decide() failed internally: {[s.as_dict() for s in decision.steps]}")
    if not decision.allowed:
        return
    w = world()
    if request.client_cert_error is not None:
        raise Violation(f"allowed a request whose certificate could not be read: {request.client_cert_error}")
    leaf = request.client_cert_chain[0] if request.client_cert_chain else None
    if leaf is not None and leaf not in w.valid_leaves:
        raise Violation("allowed a request with a certificate that cannot be verified")
    header = request.headers.get("authorization")
    words = header.split(None, 1) if header is not None else []
    scheme = words[0].lower() if words else ""
    if scheme not in ("bearer", "dpop"):
        return
    token = words[1].strip() if len(words) > 1 else ""
    claims = claims_of(token)
    if claims is None or (claims.get("jti") not in w.valid_jtis and token not in signed):
        raise Violation(f"allowed a token that is not valid: {token[:80]!r}")
    problem = _claims_problem(claims, leaf) or _dpop_problem(claims, scheme, token, request)
    if problem:
        raise Violation(f"allowed a token that RFC 9068/8705/9449 refuse here: {problem}")


def _dpop_problem(claims: Mapping[str, Any], scheme: str, token: str, request: CheckRequest) -> str:
    cnf = claims["cnf"]
    if "jkt" not in cnf:
        return "a token that is not DPoP-bound under the DPoP scheme" if scheme == "dpop" else ""
    if scheme != "dpop":
        return "a DPoP-bound token under the Bearer scheme"
    w = world()
    proof = claims_of((request.headers.get("dpop") or "").strip())
    if proof is None or w.proofs.get(str(proof.get("jti"))) is None or cnf["jkt"] != w.dpop_key.jkt:
        return "a DPoP-bound token without a proof of its key"
    ath = b64url(hashlib.sha256(token.encode()).digest())
    if proof.get("ath") != ath or not _names_request(proof.get("htm"), proof.get("htu"), request):
        return "a DPoP proof for another token or request"
    return ""


def _names_request(method: Any, url: Any, request: CheckRequest) -> bool:
    """Whether a proof for ``method url`` names this request (RFC 9449 §4.3 items 8 and 9)."""
    if not isinstance(url, str):
        return False
    parts = urllib.parse.urlsplit(url)
    host = request.host.lower().removesuffix(":443")
    return (method == request.method and (request.scheme or "https").lower() == parts.scheme
            and host == parts.netloc and request.path.split("?", 1)[0] == parts.path)


def _number(value: Any) -> bool:
    import math

    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _claims_problem(claims: Mapping[str, Any], leaf: bytes | None) -> str:
    """Why a token with these claims, signed by the issuer, must be refused on this connection ("" if not)."""
    from pdp.credentials.rfc8705 import thumbprint

    if claims.get("iss") != ISSUER:
        return "iss"
    for name in ("sub", "client_id", "jti"):
        if not isinstance(claims.get(name), str):
            return name
    if not all(_number(claims.get(n)) for n in ("exp", "iat")) or ("nbf" in claims and not _number(claims["nbf"])):
        return "exp/iat/nbf"
    if FUZZ_NOW >= claims["exp"] + LEEWAY or FUZZ_NOW + LEEWAY < claims["iat"] or \
            ("nbf" in claims and FUZZ_NOW + LEEWAY < claims["nbf"]):
        return "time"
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud
    if not isinstance(auds, list) or not all(isinstance(a, str) for a in auds) or AUDIENCE not in auds:
        return "aud"
    cnf = claims.get("cnf")
    if not isinstance(cnf, dict) or not ("jkt" in cnf or "x5t#S256" in cnf):
        return "an unbound token (bound tokens are required)"
    if "x5t#S256" in cnf and (leaf is None or cnf["x5t#S256"] != thumbprint(leaf)):
        return "x5t#S256 is not the certificate's"
    return ""


# -- running a target

def _write_seeds(directory: Path, seeds: Iterable[bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        path = directory / f"seed-{hashlib.sha1(seed).hexdigest()[:16]}"  # noqa: S324 - a file name, not security
        if not path.exists():
            path.write_bytes(seed)


def _keep_going(test_one_input: Callable[[bytes], None], folder: Path) -> Callable[[bytes], None]:
    """``test_one_input`` that records each distinct failure (exception type and the line that raised
    it) once in ``folder``, input and traceback, and goes on fuzzing instead of stopping at the first."""
    seen: set[str] = set()
    folder.mkdir(parents=True, exist_ok=True)

    def guarded(data: bytes) -> None:
        try:
            test_one_input(data)
        except Exception as exc:
            frames = traceback.extract_tb(exc.__traceback__)
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            signature = f"{type(exc).__name__} at {where}"
            if signature in seen:
                return
            seen.add(signature)
            name = hashlib.sha1(signature.encode()).hexdigest()[:12]  # noqa: S324 - a file name, not security
            (folder / f"crash-{name}").write_bytes(data)
            (folder / f"crash-{name}.txt").write_text(f"{signature}\n\n{traceback.format_exc()}")
            print(f"\n=== new failure, saved as crash-{name}: {signature}", file=sys.stderr)

    return guarded


def run(test_one_input: Callable[[bytes], None], seeds: Callable[[], Iterable[bytes]]) -> None:
    """Fuzz ``test_one_input`` with libFuzzer's command line (``-max_total_time=N``, ``-runs=N``, …).

    The first corpus directory named gets the seeds written into it (created if needed); with none,
    the corpus is ``fuzz/corpus/<target>``. A file argument is run once, as libFuzzer does, to
    reproduce a crash. With ``PDP_FUZZ_KEEP_GOING=DIR`` in the environment, each distinct failure is
    saved in DIR and fuzzing goes on (libFuzzer alone stops at the first)."""
    argv = list(sys.argv)
    paths = [a for a in argv[1:] if not a.startswith("-")]
    if not paths:
        name = Path(argv[0]).stem.removeprefix("fuzz_")
        paths = [str(REPO / "fuzz" / "corpus" / name)]
        argv.append(paths[0])
    if not Path(paths[0]).is_file():
        _write_seeds(Path(paths[0]), seeds())
    keep_going = os.environ.get("PDP_FUZZ_KEEP_GOING")
    atheris.Setup(argv, _keep_going(test_one_input, Path(keep_going)) if keep_going else test_one_input)
    atheris.Fuzz()
