"""``pdp dev token`` and ``pdp dev proof``: tokens of the ``pdp dev init`` issuer and DPoP proofs, judged by a
real pdp built from the dev setup's own config, and the commands as a user runs them."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import MappingProxyType

import jwt
import pytest

from pdp.assemble import build_pdp
from pdp.config import load_config
from pdp.credentials.rfc8705 import thumbprint
from pdp.devinit import AUDIENCE, ISSUER, dev_init
from pdp.devpki import DpopKey, load_private_key
from pdp.devtokens import DevToolError, dpop_key, mint, parse_lifetime, parse_scope, proof, target_uri
from pdp.pipeline import Pdp
from pdp.request import CheckRequest

PDP = str(Path(sys.executable).parent / "pdp")


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("devtokens") / "dev"
    dev_init(target)
    return target


@pytest.fixture(scope="module")
def dev_pdp(dev: Path) -> Pdp:
    pdp = build_pdp(load_config(dev / "pdp.toml"))
    yield pdp
    pdp.close()


def _chain(dev: Path, name: str = "client.pem") -> tuple[bytes, ...]:
    from pdp.certificates.pem import pem_to_der_chain

    return pem_to_der_chain((dev / name).read_bytes())


def decide(pdp: Pdp, dev: Path, headers: dict[str, str], *, method: str = "GET", cert: str = "client.pem",
           host: str = "api.example.org") -> tuple[bool, str, dict[str, str]]:
    decision = pdp.decide(CheckRequest(method=method, path="/orders", host=host, time=time.time(),
                                       headers=MappingProxyType(headers), client_cert_chain=_chain(dev, cert)))
    return decision.allowed, decision.reason, dict(decision.response_headers)


def pdp_cli(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PDP, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False,
                          cwd=cwd)


# -- tokens, judged by the dev setup's pdp


def test_a_token_bound_to_the_client_certificate_is_allowed_and_on_another_certificate_is_not(dev, dev_pdp):
    token = mint(dev, cert=dev / "client.pem")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["iss"], claims["aud"], claims["scope"]) == (ISSUER, AUDIENCE, "read write")
    assert claims["cnf"] == {"x5t#S256": thumbprint(_chain(dev)[0])}
    assert decide(dev_pdp, dev, {"authorization": f"Bearer {token}"})[:2] == (True, "allowed")
    assert decide(dev_pdp, dev, {"authorization": f"Bearer {token}"}, cert="other.pem")[:2] == (
        False, "binding_mismatch")


def test_the_token_is_signed_by_issuer_key_under_the_kid_jwks_json_publishes(dev):
    token = mint(dev, cert=dev / "client.pem")
    (kid,) = [k["kid"] for k in json.loads((dev / "jwks.json").read_text())["keys"]]
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "typ": "at+jwt", "kid": kid}
    key = load_private_key((dev / "issuer.key").read_bytes()).public_key()
    jwt.decode(token, key, algorithms=["ES256"], audience=AUDIENCE)  # raises on a bad signature


def test_an_unbound_token_is_refused_by_the_dev_setup(dev, dev_pdp):
    token = mint(dev)
    assert "cnf" not in jwt.decode(token, options={"verify_signature": False})
    assert decide(dev_pdp, dev, {"authorization": f"Bearer {token}"})[:2] == (False, "token_unbound")


def test_claims_options_reach_the_token(dev, dev_pdp):
    token = mint(dev, cert=dev / "client.pem", scope="read", subject="alice", client_id="cli", lifetime=90,
                 audience="https://elsewhere.example")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["sub"], claims["client_id"], claims["scope"]) == ("alice", "cli", "read")
    assert claims["exp"] - claims["iat"] == 90
    assert decide(dev_pdp, dev, {"authorization": f"Bearer {token}"})[:2] == (False, "token_audience_invalid")


def test_an_expired_token_is_refused_as_expired(dev, dev_pdp):
    token = mint(dev, cert=dev / "client.pem", expired=True)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] <= time.time() - 3000  # far past the 30 s leeway
    assert decide(dev_pdp, dev, {"authorization": f"Bearer {token}"})[:2] == (False, "token_expired")


def test_a_read_token_that_writes_gets_a_challenge_naming_the_scope(dev, dev_pdp):
    token = mint(dev, cert=dev / "client.pem", scope="read")
    allowed, reason, headers = decide(dev_pdp, dev, {"authorization": f"Bearer {token}"}, method="POST")
    assert (allowed, reason) == (False, "insufficient_scope")
    assert headers["www-authenticate"].startswith('Bearer realm="pdp", error="insufficient_scope"')
    assert headers["www-authenticate"].endswith(', scope="write"')


# -- DPoP keys and proofs


def test_a_dpop_key_file_is_created_once_private_and_reused(dev, tmp_path):
    path = tmp_path / "dpop.jwk"
    first = mint(dev, dpop_key_file=path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    jwk = json.loads(path.read_text())
    assert (jwk["kty"], jwk["crv"]) == ("EC", "P-256") and "d" in jwk
    second = mint(dev, dpop_key_file=path)
    jkt = DpopKey.from_jwk(jwk).jkt
    for token in (first, second):
        assert jwt.decode(token, options={"verify_signature": False})["cnf"] == {"jkt": jkt}


def test_a_dpop_bound_token_with_a_proof_is_allowed_and_without_one_is_a_downgrade(dev, dev_pdp, tmp_path):
    key_file = tmp_path / "dpop.jwk"
    token = mint(dev, dpop_key_file=key_file)
    key = dpop_key(key_file, create=False)
    good = proof(key, "GET", "https://api.example.org/orders?page=2#top", token=token)
    assert decide(dev_pdp, dev, {"authorization": f"DPoP {token}", "dpop": good})[:2] == (True, "allowed")
    assert decide(dev_pdp, dev, {"authorization": f"Bearer {token}"})[:2] == (False, "binding_dpop_required")
    other = proof(DpopKey.generate(), "GET", "https://api.example.org/orders", token=token)
    assert decide(dev_pdp, dev, {"authorization": f"DPoP {token}", "dpop": other})[:2] == (
        False, "binding_mismatch")  # a proof by another key than cnf.jkt names


def test_a_proof_names_method_url_token_hash_and_nonce(tmp_path):
    key = dpop_key(tmp_path / "k.jwk", create=True)
    value = proof(key, "post", "https://API.example.org:443/a/b?x=1#f", token="abc", nonce="n-1")
    header = jwt.get_unverified_header(value)
    assert header["typ"] == "dpop+jwt" and header["jwk"] == key.public_jwk and "d" not in header["jwk"]
    claims = jwt.decode(value, key.key.public_key(), algorithms=["ES256"])
    assert (claims["htm"], claims["htu"], claims["nonce"]) == ("POST", "https://API.example.org:443/a/b", "n-1")
    assert claims["ath"] == "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"  # RFC 9449 §4.2: SHA-256("abc")


@pytest.mark.parametrize("url", ["ftp://h/x", "/orders", "https:///orders", "https://h:99999/", "api.example.org"])
def test_a_proof_needs_an_absolute_http_url(url):
    with pytest.raises(DevToolError, match=r"^URL: "):
        target_uri(url)


def test_a_dpop_key_file_that_is_not_a_private_p256_jwk_is_refused(tmp_path):
    bad = tmp_path / "bad.jwk"
    jwk = DpopKey.generate().private_jwk
    for doc in ("not json", json.dumps({**jwk, "d": DpopKey.generate().private_jwk["d"]}),
                json.dumps({k: v for k, v in jwk.items() if k != "d"}), json.dumps({**jwk, "crv": "P-384"})):
        bad.write_text(doc)
        with pytest.raises(DevToolError, match=re.escape(f"--dpop-key: '{bad}' is not a private EC P-256 JWK")):
            dpop_key(bad, create=False)
    with pytest.raises(DevToolError, match="does not exist"):
        dpop_key(tmp_path / "missing.jwk", create=False)


# -- option errors name the option or file


def test_option_errors_name_the_option(dev, tmp_path):
    with pytest.raises(DevToolError, match=r"^--lifetime: '1x' is not a duration"):
        parse_lifetime("1x")
    with pytest.raises(DevToolError, match=r"^--scope: "):
        parse_scope('read "write"')
    assert parse_scope("  read write read ") == "read write"
    with pytest.raises(DevToolError, match=r"^--dir: .* is not a folder"):
        mint(tmp_path / "nowhere")
    with pytest.raises(DevToolError, match=r"^--dir: .* holds no issuer.key"):
        mint(tmp_path)
    with pytest.raises(DevToolError, match=r"^--cert: .* holds 0 certificates that are not CAs"):
        mint(dev, cert=dev / "ca.pem")
    with pytest.raises(DevToolError, match=r"^--cert: cannot read"):
        mint(dev, cert=tmp_path / "missing.pem")


def test_an_issuer_key_the_jwks_does_not_publish_is_refused(dev, tmp_path):
    copy = tmp_path / "dev"
    dev_init(copy)
    (copy / "jwks.json").write_text((dev / "jwks.json").read_text())  # another setup's key set
    with pytest.raises(DevToolError, match="does not publish the key of"):
        mint(copy)
    (copy / "issuer.key").write_text("garbage")
    with pytest.raises(DevToolError, match="is not an unencrypted EC private key"):
        mint(copy)


# -- the commands


def test_dev_token_prints_only_the_token_and_finds_dev_by_default(dev):
    result = pdp_cli("dev", "token", "--cert", "dev/client.pem", "--scope", "read", "--lifetime", "15m",
                     cwd=dev.parent)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    (line,) = result.stdout.splitlines()
    claims = jwt.decode(line, options={"verify_signature": False})
    assert claims["scope"] == "read" and claims["exp"] - claims["iat"] == 900


@pytest.mark.parametrize(("args", "names"), [
    (("--dir", "no-such-folder"), "--dir: 'no-such-folder'"),
    (("--lifetime", "soon"), "--lifetime: 'soon'"),
    (("--cert", "missing.pem"), "--cert: cannot read 'missing.pem'"),
    (("--dpop-key", "no/such/dir/k.jwk"), "--dpop-key: cannot create 'no/such/dir/k.jwk'"),
])
def test_dev_token_errors_are_one_line_naming_the_option_exit_2(dev, args, names):
    result = pdp_cli("dev", "token", *args, cwd=dev.parent)
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"pdp dev token: {names}"), line


def test_dev_proof_command_with_a_token_from_stdin(dev, tmp_path):
    key_file = tmp_path / "k.jwk"
    token = pdp_cli("dev", "token", "--dir", str(dev), "--dpop-key", str(key_file)).stdout.strip()
    result = pdp_cli("dev", "proof", "GET", "https://api.example.org/orders", "--dpop-key", str(key_file),
                     "--token", "-", "--nonce", "abc", stdin=f"DPoP {token}\n")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    claims = jwt.decode(line, dpop_key(key_file, create=False).key.public_key(), algorithms=["ES256"])
    assert claims["nonce"] == "abc" and claims["htu"] == "https://api.example.org/orders"
    from pdp.credentials.rfc9449 import access_token_hash

    assert claims["ath"] == access_token_hash(token)
    missing = pdp_cli("dev", "proof", "GET", "https://api.example.org/", "--dpop-key", str(tmp_path / "none.jwk"))
    assert missing.returncode == 2 and missing.stderr.startswith("pdp dev proof: --dpop-key: ")
    assert len(missing.stderr.splitlines()) == 1


def test_dev_init_prints_a_dev_token_command_that_runs(tmp_path):
    init = pdp_cli("dev", "init", str(tmp_path / "setup"))
    assert init.returncode == 0, init.stderr
    (command,) = [line.strip() for line in init.stdout.splitlines() if " dev token --dir " in line]
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("DENY 403 insufficient_scope") and 'scope="write"' in result.stdout
    assert 'policy answer: {"allowed": false, "reason": "insufficient_scope", "scope": "write"}' in result.stdout
