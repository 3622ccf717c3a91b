"""The TOML configuration: defaults, path-qualified errors, relative paths, and load errors at build time."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import bound_token, check_request
from pdp.policies import DEFAULT_POLICY_DIR

from pdp.assemble import build_pdp
from pdp.config import Config, ConfigError, IssuerConfig, load_config, parse_config
from pdp.credentials.rfc9068 import PLAIN_REQUIRED_CLAIMS, PROFILE_REQUIRED_CLAIMS
from pdp.errors import LoadError

BASE = Path("/etc/pdp")


def issuer(**kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"issuer": "https://issuer.test", "audiences": ["https://api.test"],
                           "jwks_file": "jwks.json"}
    doc.update(kw)
    return {k: v for k, v in doc.items() if v is not None}


def error_of(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse_config(data, BASE)
    return err.value


# -- defaults

def test_defaults() -> None:
    cfg = Config.defaults()
    assert parse_config({}, BASE) == cfg
    assert cfg.server.http == "127.0.0.1:8181"
    assert cfg.server.reload_interval == 2.0
    assert cfg.policy.engine == "regorus"
    assert cfg.policy.paths == (DEFAULT_POLICY_DIR,)
    assert cfg.policy.data == ()
    assert cfg.policy.decision == "pdp/authz/result"
    assert cfg.certificates.trust_bundles == ()
    assert cfg.certificates.max_chain_depth == 4
    assert cfg.tokens.issuers == ()
    assert cfg.tokens.leeway == 30.0
    assert cfg.tokens.require_bound is False
    assert cfg.decision.realm == "pdp"
    assert cfg.decision.remove_authorization is True
    assert cfg.decision.upstream.spiffe_id == "x-pdp-spiffe-id"
    assert cfg.log.level == "info" and cfg.log.decisions is True
    assert cfg.source is None


def test_defaults_build_a_pdp_that_refuses_credentials_but_serves_public_paths(pki: Any, issuer: Any) -> None:
    pdp = build_pdp(Config.defaults(), probe=False)
    assert pdp.decide(check_request(path="/healthz")).allowed
    with_cert = pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
    assert not with_cert.allowed and with_cert.reason == "cert_untrusted"
    token_only = pdp.decide(check_request(token=bound_token(issuer, pki.client)))
    assert not token_only.allowed and token_only.reason == "token_issuer_unknown"


def test_issuer_defaults() -> None:
    cfg = parse_config({"tokens": {"issuers": [issuer()]}}, BASE)
    (iss,) = cfg.tokens.issuers
    assert iss.algorithms == ("RS256", "ES256")
    assert iss.required_claims == PROFILE_REQUIRED_CLAIMS
    assert iss.jwks_file == BASE / "jwks.json"
    assert iss.jwks_timeout == IssuerConfig.jwks_timeout
    plain = parse_config({"tokens": {"issuers": [issuer(accept_plain_jwt=True)]}}, BASE).tokens.issuers[0]
    assert plain.required_claims == PLAIN_REQUIRED_CLAIMS


def test_required_claims_always_start_with_iss_and_exp() -> None:
    cfg = parse_config({"tokens": {"issuers": [issuer(required_claims=["sub", "exp"])]}}, BASE)
    assert cfg.tokens.issuers[0].required_claims == ("iss", "exp", "sub")


def test_a_full_config() -> None:
    cfg = parse_config({
        "server": {"http": "[::1]:0", "reload_interval": 0, "max_body_bytes": 4096},
        "policy": {"engine": "regorus", "paths": "policy", "data": ["extra.json"], "decision": "envoy/authz/allow"},
        "certificates": {"trust_bundles": [{"name": "corp", "file": "/abs/ca.pem", "trust_domain": "corp.example"}],
                         "max_chain_depth": 2, "cache_size": 0},
        "tokens": {"issuers": [issuer(algorithms="ES256", jwks_file=None, jwks_url="https://issuer.test/jwks")],
                   "leeway": 5, "require_bound": True},
        "decision": {"realm": "api", "remove_authorization": False, "max_headers": 10,
                     "upstream_headers": {"subject": "", "spiffe_id": "X-Client-ID"}},
        "log": {"level": "DEBUG", "decisions": False},
    }, BASE)
    assert cfg.server.http == "[::1]:0"
    assert cfg.policy.engine == "regorus"
    assert cfg.policy.paths == (BASE / "policy",)
    assert cfg.policy.data == (BASE / "extra.json",)
    assert cfg.certificates.trust_bundles[0].file == Path("/abs/ca.pem")
    assert cfg.certificates.trust_bundles[0].trust_domain == "corp.example"
    assert cfg.tokens.issuers[0].algorithms == ("ES256",)
    assert cfg.tokens.issuers[0].jwks_url == "https://issuer.test/jwks"
    assert cfg.tokens.require_bound is True
    assert cfg.decision.require_bound_tokens is True  # tokens.require_bound drives the pipeline setting
    assert cfg.decision.upstream.subject == ""
    assert cfg.decision.upstream.spiffe_id == "x-client-id"
    assert cfg.decision.remove_authorization is False
    assert cfg.log.level == "debug" and cfg.log.decisions is False


# -- errors name their key

@pytest.mark.parametrize("data,key,fragment", [
    ({"serverr": {}}, "serverr", "did you mean 'server'"),
    ({"server": {"htp": "a:1"}}, "server.htp", "did you mean 'http'"),
    ({"policy": {"engin": "regorus"}}, "policy.engin", "did you mean 'engine'"),
    ({"tokens": {"issuers": [issuer(audience=["x"])]}}, "tokens.issuers[0].audience",
     "unknown key (did you mean 'audiences'?)"),
    ({"tokens": {"issuers": [issuer(), issuer(issuer="https://b.test", jwks_fil="x")]}},
     "tokens.issuers[1].jwks_fil", "did you mean 'jwks_file'"),
    ({"certificates": {"trust_bundles": [{"file": "a.pem", "trust_domian": "x"}]}},
     "certificates.trust_bundles[0].trust_domian", "did you mean 'trust_domain'"),
    ({"decision": {"upstream_headers": {"subjct": "x"}}}, "decision.upstream_headers.subjct", "did you mean"),
    ({"log": {"zzz": 1}}, "log.zzz", "unknown key"),
])
def test_unknown_keys(data: dict[str, Any], key: str, fragment: str) -> None:
    err = error_of(data)
    assert err.key == key
    assert fragment in err.message
    assert str(err).startswith(f"{key}: ")


@pytest.mark.parametrize("data,key", [
    ({"tokens": {"issuers": [issuer(audiences=None, audience=["https://api.test"])]}}, "tokens.issuers[0].audience"),
    ({"tokens": {"issuers": [issuer(issuer=None, isuer="https://i.test")]}}, "tokens.issuers[0].isuer"),
    ({"certificates": {"trust_bundles": [{"fil": "ca.pem"}]}}, "certificates.trust_bundles[0].fil"),
])
def test_misspelt_required_key_is_named_with_a_hint(data: dict[str, Any], key: str) -> None:
    err = error_of(data)
    assert err.key == key
    assert "did you mean" in err.message


@pytest.mark.parametrize("data,key", [
    ({"server": 1}, "server"),
    ({"tokens": []}, "tokens"),
    ({"server": {"http": 8181}}, "server.http"),
    ({"server": {"http": ""}}, "server.http"),
    ({"server": {"reload_interval": "2"}}, "server.reload_interval"),
    ({"server": {"reload_interval": True}}, "server.reload_interval"),
    ({"server": {"reload_interval": -1}}, "server.reload_interval"),
    ({"server": {"max_body_bytes": 100}}, "server.max_body_bytes"),
    ({"server": {"max_body_bytes": 2048.5}}, "server.max_body_bytes"),
    ({"policy": {"paths": 5}}, "policy.paths"),
    ({"policy": {"paths": [""]}}, "policy.paths"),
    ({"policy": {"paths": ["a", 1]}}, "policy.paths"),
    ({"policy": {"data": {"a": 1}}}, "policy.data"),
    ({"policy": {"decision": 1}}, "policy.decision"),
    ({"certificates": {"trust_bundles": {"file": "x"}}}, "certificates.trust_bundles"),
    ({"certificates": {"trust_bundles": ["x.pem"]}}, "certificates.trust_bundles[0]"),
    ({"certificates": {"trust_bundles": [{}]}}, "certificates.trust_bundles[0].file"),
    ({"certificates": {"max_chain_depth": 0}}, "certificates.max_chain_depth"),
    ({"certificates": {"cache_size": -1}}, "certificates.cache_size"),
    ({"tokens": {"issuers": {"issuer": "x"}}}, "tokens.issuers"),
    ({"tokens": {"issuers": [issuer(), "x"]}}, "tokens.issuers[1]"),
    ({"tokens": {"issuers": [issuer(issuer=None)]}}, "tokens.issuers[0].issuer"),
    ({"tokens": {"issuers": [issuer(issuer=5)]}}, "tokens.issuers[0].issuer"),
    ({"tokens": {"issuers": [issuer(audiences="")]}}, "tokens.issuers[0].audiences"),
    ({"tokens": {"issuers": [issuer(audiences=[1])]}}, "tokens.issuers[0].audiences"),
    ({"tokens": {"issuers": [issuer(accept_plain_jwt="yes")]}}, "tokens.issuers[0].accept_plain_jwt"),
    ({"tokens": {"issuers": [issuer(jwks_timeout=0)]}}, "tokens.issuers[0].jwks_timeout"),
    ({"tokens": {"issuers": [issuer(required_claims=[""])]}}, "tokens.issuers[0].required_claims"),
    ({"tokens": {"leeway": "30"}}, "tokens.leeway"),
    ({"tokens": {"require_bound": 1}}, "tokens.require_bound"),
    ({"decision": {"realm": ""}}, "decision.realm"),
    ({"decision": {"remove_authorization": "no"}}, "decision.remove_authorization"),
    ({"decision": {"max_headers": 0}}, "decision.max_headers"),
    ({"decision": {"max_header_bytes": 10}}, "decision.max_header_bytes"),
    ({"decision": {"upstream_headers": {"subject": "bad name"}}}, "decision.upstream_headers.subject"),
    ({"decision": {"upstream_headers": {"subject": 5}}}, "decision.upstream_headers.subject"),
    ({"decision": {"upstream_headers": {"decision_id": "a:b"}}}, "decision.upstream_headers.decision_id"),
    ({"log": {"decisions": "yes"}}, "log.decisions"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_wrong_types_and_values(data: dict[str, Any], key: str) -> None:
    assert error_of(data).key == key


@pytest.mark.parametrize("algs", [["none"], ["None"], ["NONE"], ["HS256"], ["hs384"], ["ES256", "HS512"]])
def test_none_and_hmac_algorithms_are_refused(algs: list[str]) -> None:
    err = error_of({"tokens": {"issuers": [issuer(algorithms=algs)]}})
    assert err.key == "tokens.issuers[0].algorithms"
    assert "never accepted" in err.message


@pytest.mark.parametrize("alg", ["XS256", "es256", "RSA", "ES256K", ""])
def test_unknown_algorithm(alg: str) -> None:
    err = error_of({"tokens": {"issuers": [issuer(algorithms=[alg])]}})
    assert err.key == "tokens.issuers[0].algorithms"


@pytest.mark.parametrize("algs", [["RS256"], ["PS512", "EdDSA", "ES384"], "ES256"])
def test_known_algorithms_accepted(algs: Any) -> None:
    cfg = parse_config({"tokens": {"issuers": [issuer(algorithms=algs)]}}, BASE)
    assert cfg.tokens.issuers[0].algorithms == ((algs,) if isinstance(algs, str) else tuple(algs))


@pytest.mark.parametrize("sources", [
    {"jwks_file": None},
    {"jwks_url": "https://issuer.test/jwks"},
    {"discovery": True},
    {"jwks_file": None, "jwks_url": "https://issuer.test/jwks", "discovery": True},
], ids=["none", "file+url", "file+discovery", "url+discovery"])
def test_issuer_needs_exactly_one_key_source(sources: dict[str, Any]) -> None:
    err = error_of({"tokens": {"issuers": [issuer(**sources)]}})
    assert err.key == "tokens.issuers[0]"
    assert "exactly one of jwks_file, jwks_url, discovery = true or introspection_endpoint" in err.message


@pytest.mark.parametrize("sources", [{"jwks_file": None, "jwks_url": "https://issuer.test/jwks"},
                                     {"jwks_file": None, "discovery": True}])
def test_issuer_with_one_remote_source(sources: dict[str, Any]) -> None:
    (iss,) = parse_config({"tokens": {"issuers": [issuer(**sources)]}}, BASE).tokens.issuers
    assert iss.jwks_file is None


def test_jwks_url_must_be_http() -> None:
    err = error_of({"tokens": {"issuers": [issuer(jwks_file=None, jwks_url="file:///etc/jwks.json")]}})
    assert err.key == "tokens.issuers[0].jwks_url"


def test_discovery_needs_an_http_issuer() -> None:
    err = error_of({"tokens": {"issuers": [issuer(issuer="urn:example:issuer", jwks_file=None, discovery=True)]}})
    assert err.key == "tokens.issuers[0].discovery"


@pytest.mark.parametrize("audiences", [None, []], ids=["missing", "empty"])
def test_missing_audiences(audiences: Any) -> None:
    err = error_of({"tokens": {"issuers": [issuer(audiences=audiences)]}})
    assert err.key == "tokens.issuers[0].audiences"
    assert "required" in err.message


def test_duplicate_issuer() -> None:
    err = error_of({"tokens": {"issuers": [issuer(), issuer(issuer="https://other.test"), issuer()]}})
    assert err.key == "tokens.issuers[2].issuer"
    assert "configured twice" in err.message


def test_duplicate_trust_bundle_name() -> None:
    err = error_of({"certificates": {"trust_bundles": [{"name": "corp", "file": "a.pem"},
                                                       {"name": "corp", "file": "b.pem"}]}})
    assert err.key == "certificates.trust_bundles[1].name"
    assert "'corp'" in err.message


def test_duplicate_trust_bundle_name_defaulted_from_the_file() -> None:
    err = error_of({"certificates": {"trust_bundles": [{"file": "a.pem"}, {"file": "a.pem"}]}})
    assert err.key == "certificates.trust_bundles[1].name"


@pytest.mark.parametrize("domain", ["Example.org", "spiffe://example.org", "exa mple.org", "example.org:8443",
                                    "ex@mple.org", ""])
def test_bad_trust_domain(domain: str) -> None:
    err = error_of({"certificates": {"trust_bundles": [{"file": "a.pem", "trust_domain": domain}]}})
    assert err.key == "certificates.trust_bundles[0].trust_domain"


@pytest.mark.parametrize("domain", ["example.org/workloads", "example.org/a/b"])
def test_trust_domain_with_a_path_is_refused(domain: str) -> None:
    err = error_of({"certificates": {"trust_bundles": [{"file": "a.pem", "trust_domain": domain}]}})
    assert err.key == "certificates.trust_bundles[0].trust_domain"


def test_non_ascii_upstream_header_name_is_refused() -> None:
    err = error_of({"decision": {"upstream_headers": {"subject": "x-caf\u00e9"}}})
    assert err.key == "decision.upstream_headers.subject"


@pytest.mark.parametrize("listen", ["localhost", "localhost:", ":8080", "host:port", "host:65536", "host:-1",
                                    "host:80:x"])
def test_bad_server_http(listen: str) -> None:
    err = error_of({"server": {"http": listen}})
    assert err.key == "server.http"
    assert "HOST:PORT" in err.message


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "0.0.0.0:8181", "[::1]:65535", "pdp.internal:443"])
def test_good_server_http(listen: str) -> None:
    assert parse_config({"server": {"http": listen}}, BASE).server.http == listen


@pytest.mark.parametrize("engine", ["OPA", "REGORUS", "rego", ""])
def test_bad_policy_engine(engine: str) -> None:
    assert error_of({"policy": {"engine": engine}}).key == "policy.engine"


@pytest.mark.parametrize("engine", ["regopy", "regorus"])
def test_good_policy_engine(engine: str) -> None:
    assert parse_config({"policy": {"engine": engine}}, BASE).policy.engine == engine


@pytest.mark.parametrize("level", ["verbose", "trace", "critical", "", 10])
def test_bad_log_level(level: Any) -> None:
    assert error_of({"log": {"level": level}}).key == "log.level"


@pytest.mark.parametrize("level", ["debug", "INFO", "Warning", "error"])
def test_good_log_level(level: str) -> None:
    assert parse_config({"log": {"level": level}}, BASE).log.level == level.lower()


# -- files

def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "pdp.toml"
    path.write_text("[server\nhttp = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as err:
        load_config(path)
    assert str(path) in err.value.message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml")


def test_load_config_errors_name_keys_too(tmp_path: Path) -> None:
    path = tmp_path / "pdp.toml"
    path.write_text('[[tokens.issuers]]\nissuer = "https://i.test"\naudiences = ["a"]\njwks_file = "j.json"\n'
                    'algorithms = ["HS256"]\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == "tokens.issuers[0].algorithms"


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "pdp.toml").write_text(
        '[policy]\npaths = ["policy", "/abs/policy"]\ndata = ["data/extra.json"]\n'
        '[[certificates.trust_bundles]]\nfile = "certs/ca.pem"\n'
        '[[tokens.issuers]]\nissuer = "https://i.test"\naudiences = ["a"]\njwks_file = "keys/jwks.json"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("../conf/pdp.toml"))
    assert cfg.policy.paths == (folder / "policy", Path("/abs/policy"))
    assert cfg.policy.data == (folder / "data" / "extra.json",)
    assert cfg.certificates.trust_bundles[0].file == folder / "certs" / "ca.pem"
    assert cfg.tokens.issuers[0].jwks_file == folder / "keys" / "jwks.json"
    assert all(p.is_absolute() for p in (*cfg.policy.paths, *cfg.policy.data))
    assert cfg.source == Path("../conf/pdp.toml")


def test_home_relative_path(tmp_path: Path) -> None:
    cfg = parse_config({"policy": {"paths": ["~/policy"]}}, tmp_path)
    assert cfg.policy.paths == (Path.home() / "policy",)


# -- load errors at build time name the setting

def test_the_written_setup_builds(write_setup: Any, pki: Any, issuer: Any) -> None:
    pdp = build_pdp(load_config(write_setup()), probe=False)
    assert pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client))).allowed


def test_missing_trust_bundle_file(write_setup: Any, tmp_path: Path) -> None:
    config = load_config(write_setup())
    (tmp_path / "ca.pem").unlink()
    with pytest.raises(LoadError) as err:
        build_pdp(config, probe=False)
    assert err.value.key == "certificates.trust_bundles[0].file"
    assert str(tmp_path / "ca.pem") in err.value.message


def test_trust_bundle_that_is_not_pem(write_setup: Any, tmp_path: Path) -> None:
    config = load_config(write_setup())
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(LoadError) as err:
        build_pdp(config, probe=False)
    assert err.value.key == "certificates.trust_bundles[0].file"


def test_second_trust_bundle_missing(write_setup: Any, tmp_path: Path) -> None:
    config = load_config(write_setup(extra='[[certificates.trust_bundles]]\nname = "b"\nfile = "missing.pem"\n'))
    with pytest.raises(LoadError) as err:
        build_pdp(config, probe=False)
    assert err.value.key == "certificates.trust_bundles[1].file"


def test_missing_jwks_file(write_setup: Any, tmp_path: Path) -> None:
    config = load_config(write_setup())
    (tmp_path / "jwks.json").unlink()
    with pytest.raises(LoadError) as err:
        build_pdp(config, probe=False)
    assert err.value.key == "tokens.issuers[0].jwks_file"


def test_jwks_file_that_is_not_a_key_set(write_setup: Any, tmp_path: Path) -> None:
    config = load_config(write_setup())
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(LoadError) as err:
        build_pdp(config, probe=False)
    assert err.value.key == "tokens.issuers[0].jwks_file"


def test_missing_policy_folder(write_setup: Any, tmp_path: Path) -> None:
    config = load_config(write_setup(policy_paths=[str(tmp_path / "no-such-policy")]))
    with pytest.raises(LoadError) as err:
        build_pdp(config, probe=False)
    assert err.value.key == "policy.paths"


def test_policy_that_does_not_compile(write_setup: Any, tmp_path: Path, engine: str) -> None:
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "p.rego").write_text("package pdp.authz\nresult := {\n")
    config = load_config(write_setup(engine=engine, policy_paths=[str(tmp_path / "pol")]))
    with pytest.raises(LoadError) as err:
        build_pdp(config, probe=False)
    assert err.value.key == "policy.paths"
    del err  # break the frame/traceback cycle: a regorus Engine must not be collected on another thread


def test_config_values_reach_the_pdp(write_setup: Any, pki: Any, issuer: Any) -> None:
    extra = ('[decision]\nrealm = "orders-api"\nremove_authorization = false\n'
             '[decision.upstream_headers]\nsubject = ""\nspiffe_id = "X-Caller"\n')
    pdp = build_pdp(load_config(write_setup(extra=extra)), probe=False)
    allowed = pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
    assert allowed.allowed
    assert allowed.headers["x-caller"] == "spiffe://example.org/demo/client"
    assert "x-pdp-subject" not in allowed.headers and "x-pdp-spiffe-id" not in allowed.headers
    assert "authorization" not in allowed.headers_to_remove
    denied = pdp.decide(check_request(chain=pki.chain()))
    assert denied.response_headers["www-authenticate"] == 'Bearer realm="orders-api"'
    expired = pdp.decide(check_request(chain=pki.chain(), token=bound_token(
        issuer, pki.client, now=time.time() - 7200, lifetime=60)))
    assert expired.reason == "token_expired"
    assert expired.response_headers["www-authenticate"].startswith('Bearer realm="orders-api", error="invalid_token"')
