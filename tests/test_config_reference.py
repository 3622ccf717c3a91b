"""docs/configuration.md against the loader: every key pdp/config.py reads is documented in its table, every
documented key is read, and the documented defaults are the loader's.

The loader's keys are found by watching it: every ``_Table`` it makes records the keys it reads
(``used``), and ``done()`` refuses every other key. Loading one config that sets every documented key
(so each branch is taken: TLS, each kind of issuer, each kind of introspection client) yields the keys
the loader accepts, table by table.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from pdp import config as loader
from pdp.config import Config, parse_config

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "configuration.md"

_HEADING = re.compile(r"^## (?:Top level|\[\[?([a-z_.]+)\]\]?)\s*$")
_ROW = re.compile(r"^\| `([a-z0-9_]+)` \|([^|]*)\|([^|]*)\|")


def documented() -> dict[str, dict[str, str]]:
    """Section ("" for the top level, "tokens.issuers" for ``[[tokens.issuers]]``) → key → default cell."""
    sections: dict[str, dict[str, str]] = {}
    current: str | None = None
    for line in REFERENCE.read_text("utf-8").splitlines():
        if line.startswith("## "):
            m = _HEADING.match(line)
            assert m is not None, f"a section heading that is not a table: {line!r}"
            current = m.group(1) or ""
            assert current not in sections, f"section [{current}] twice"
            sections[current] = {}
        elif current is not None and (row := _ROW.match(line)):
            key = row.group(1)
            assert key not in sections[current], f"{current}.{key} listed twice"
            sections[current][key] = row.group(3).strip()
    return sections


def full_config(tmp: Path) -> dict[str, Any]:
    """A config that sets every documented key (the files the loader checks exist; it reads none)."""
    for name in ("listener.pem", "listener.key", "callers.pem"):
        (tmp / name).write_text("not read by the loader\n")
    return {
        "server": {"http": "127.0.0.1:18181", "grpc": "", "grpc_workers": 2, "reload_interval": 0,
                   "max_body_bytes": 2048, "admin": True, "admin_callers": ["spiffe://example.org/gateway"],
                   "tls": {"cert": "listener.pem", "key": "listener.key", "client_ca": "callers.pem",
                           "allowed_callers": ["spiffe://example.org/gateway"]}},
        "policy": {"engine": "regorus", "paths": ["policy"], "data": ["extra.json"], "decision": "pdp/authz/allow",
                   "decision_cache_size": 0, "divergence": "warn", "rego_version": "v0", "dry_run": True,
                   "proto_descriptor": "api.pb",
                   "shadow": {"paths": ["next"], "data": ["next.json"], "decision": "pdp/authz/next",
                              "rego_version": "v1", "timeout": 2.5},
                   "opa": {"url": "https://opa.example:8181", "timeout": 0.3, "token_file": "opa.token",
                           "ca": "opa-ca.pem", "max_answer_bytes": 4096, "client_cert": "pdp-opa.pem",
                           "client_key": "pdp-opa.key", "max_connections": 4, "unready_after_failure": 1.5}},
        "certificates": {"max_chain_depth": 2, "cache_size": 0, "trust_bundles": [
            {"file": "ca.pem", "name": "example", "trust_domain": "example.org", "intermediates": "inter.pem",
             "crls": ["inter.crl"], "require_crl": True, "revocation": "soft", "ocsp": False,
             "crl_distribution_points": False, "require_revocation": True, "revocation_timeout": 1.5,
             "max_crl_bytes": 65536}]},
        "tokens": {"leeway": 5, "cache_size": 0, "require_bound": True, "issuers": [
            {"issuer": "https://a.example", "audiences": ["https://api.example"], "algorithms": ["ES256"],
             "jwks_file": "jwks.json", "accept_plain_jwt": True, "required_claims": ["sub"], "jwks_timeout": 1,
             "jwks_refresh_interval": 60, "jwks_min_refresh_interval": 5},
            {"issuer": "https://b.example", "audiences": ["https://api.example"],
             "jwks_url": "https://b.example/jwks"},
            {"issuer": "https://c.example", "audiences": ["https://api.example"], "discovery": True},
            {"issuer": "https://d.example", "audiences": ["https://api.example"],
             "introspection_endpoint": "https://d.example/introspect", "introspection_client_id": "pdp",
             "introspection_client_secret": "s3cret", "introspection_auth": "tls_client_auth",
             "introspection_client_cert": "pdp.pem", "introspection_client_key": "pdp.key",
             "introspection_ca": "as-ca.pem", "introspection_cache_ttl": 60, "introspection_negative_ttl": 1,
             "introspection_timeout": 2}]},
        "decision": {"realm": "api", "remove_authorization": False, "max_header_bytes": 2048, "max_headers": 10,
                     "max_path_bytes": 512,
                     "upstream_headers": {"spiffe_id": "", "subject": "x-sub", "client_id": "x-client",
                                          "cert_thumbprint": "x-x5t", "decision_id": "x-id"}},
        "gateway": {"ext_authz_prefix": "/authz", "forwarded_request": "nginx",
                    "trusted_proxies": ["10.0.0.0/8", "spiffe://example.org/gateway"], "cert_header": "xfcc",
                    "cert_header_name": "x-client-cert", "xfcc_element": "first",
                    "xfcc_by": "spiffe://example.org/gateway"},
        "dpop": {"algorithms": ["ES256"], "iat_window": 30, "require_nonce": True, "nonce_lifetime": 60,
                 "max_proofs_per_key": 100, "busy_proofs_per_key": 10, "replay_margin": 1, "nonce_secret": "n" * 32},
        "introspection": {
            "enabled": True, "issuer": "https://pdp.example", "leeway": 1,
            "lockout": {"source_failures": 3, "client_failures": 30, "window": 60, "duration": 10,
                        "max_duration": 100, "max_tracked": 1000},
            "clients": [{"client_id": "a", "secret_sha256": "0" * 64, "audiences": ["https://api.example"]},
                        {"client_id": "b", "tls_client_auth_subject_dn": "CN=b"},
                        {"client_id": "c", "tls_client_auth_san_dns": "c.example"},
                        {"client_id": "d", "tls_client_auth_san_uri": "spiffe://example.org/d"},
                        {"client_id": "e", "tls_client_auth_san_ip": "10.0.0.1"},
                        {"client_id": "f", "tls_client_auth_san_email": "f@example.org"}]},
        "store": {"url": "redis://127.0.0.1:6379/15", "prefix": "test:", "timeout": 0.5, "secret": "ab" * 32},
        "log": {"level": "debug", "decisions": False, "include_input": True, "redact_headers": ["x-tenant-key"]},
        "inventory": {"enabled": False, "max_identities": 10, "update_interval": 5, "keep_expired": 0},
    }


def read_by_loader(data: Mapping[str, Any], base: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Load ``data``; per section, the keys the loader read (and so accepts) and the keys ``data`` set."""
    made: list[loader._Table] = []
    init = loader._Table.__init__

    def watching(self: loader._Table, table: Mapping[str, Any], path: str) -> None:
        init(self, table, path)
        made.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loader._Table, "__init__", watching)
        parse_config(data, base)
    read: dict[str, set[str]] = defaultdict(set)
    given: dict[str, set[str]] = defaultdict(set)
    for table in made:
        section = re.sub(r"\[\d+\]", "", table.path)
        read[section] |= table.used
        given[section] |= set(table.data)
    return read, given


def test_every_key_the_loader_accepts_is_documented_in_its_section_and_no_other(tmp_path: Path) -> None:
    reference = documented()
    read, _ = read_by_loader(full_config(tmp_path), tmp_path)
    assert sorted(read) == sorted(reference), "sections: docs/configuration.md against the loader's tables"
    for section, keys in read.items():
        listed = set(reference[section])
        name = f"[{section}]" if section else "the top level"
        assert sorted(keys - listed) == [], f"{name}: accepted by pdp/config.py, missing from docs/configuration.md"
        assert sorted(listed - keys) == [], f"{name}: listed in docs/configuration.md, not accepted by pdp/config.py"


def test_the_full_config_sets_every_documented_key(tmp_path: Path) -> None:
    """So the test above takes every branch of the loader, and each documented key is shown accepted."""
    _, given = read_by_loader(full_config(tmp_path), tmp_path)
    for section, keys in documented().items():
        assert sorted(set(keys) - given[section]) == [], f"[{section}]: set these in full_config too"


_GETTERS = {"text", "flag", "number", "integer", "strings", "table", "tables", "get", "add", "missing"}


def test_every_key_name_written_in_the_loader_is_documented() -> None:
    """A second net, for a key read on a branch the full config does not take: every string the loader
    passes to a ``_Table`` getter (or ``t.used.add``, ``t.data.get``, ``_listen``, ``"key" in t.data``)."""
    tree = ast.parse(Path(loader.__file__).read_text("utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            args = node.args[1:] if called == "_listen" else node.args
            if (called in _GETTERS or called == "_listen") and args and isinstance(args[0], ast.Constant) \
                    and isinstance(args[0].value, str):
                names.add(args[0].value)
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) \
                and isinstance(node.left.value, str) and isinstance(node.ops[0], ast.In) \
                and isinstance(node.comparators[0], ast.Attribute) and node.comparators[0].attr == "data":
            names.add(node.left.value)
    listed = {key for keys in documented().values() for key in keys}
    assert "introspection_client_cert" in names and "grpc" in names  # the walk finds what it should
    assert sorted(names - listed) == [], "read by pdp/config.py, missing from docs/configuration.md"


def _defaults(base: Path) -> dict[str, Any]:
    """Each section's parsed values when nothing but the required keys is set."""
    tmp = base
    (tmp / "c.pem").write_text("x")
    cfg = parse_config({"server": {"tls": {"cert": "c.pem", "key": "c.pem"}},
                        "certificates": {"trust_bundles": [{"file": "ca.pem"}]},
                        "tokens": {"issuers": [
                            {"issuer": "https://a.example", "audiences": ["x"], "jwks_file": "j.json"},
                            {"issuer": "https://b.example", "audiences": ["x"], "introspection_client_id": "pdp",
                             "introspection_endpoint": "https://b.example/i", "introspection_client_secret": "s"}]},
                        "introspection": {"clients": [{"client_id": "a", "secret_sha256": "0" * 64}]}}, tmp)
    plain = Config.defaults()
    jwt, opaque = cfg.tokens.issuers
    return {
        "server": plain.server, "server.tls": cfg.server.tls, "policy": plain.policy,
        "certificates": plain.certificates, "certificates.trust_bundles": cfg.certificates.trust_bundles[0],
        "tokens": plain.tokens, "decision": plain.decision, "decision.upstream_headers": plain.decision.upstream,
        "gateway": plain.gateway, "dpop": plain.dpop, "introspection": plain.introspection,
        "introspection.clients": cfg.introspection.clients[0], "introspection.lockout": plain.introspection.lockout,
        "store": plain.store, "log": plain.log, "inventory": plain.inventory, "tokens.issuers": (jwt, opaque),
    }


def _same(documented_value: Any, value: Any) -> bool:
    if isinstance(value, frozenset | set):
        return isinstance(documented_value, list) and set(documented_value) == value
    if isinstance(value, tuple):
        return documented_value == list(value)
    if isinstance(value, float) and isinstance(documented_value, int | float):
        return float(documented_value) == value
    return bool(documented_value == value and type(documented_value) is type(value))


def test_documented_defaults_are_the_loaders(tmp_path: Path) -> None:
    """Where the default cell is one TOML value and the section's object has an attribute of the key's name."""
    compared = 0
    objects = _defaults(tmp_path)
    for section, rows in documented().items():
        targets = objects.get(section)
        for key, cell in rows.items():
            literal = re.fullmatch(r"`([^`]*)`", cell)
            if literal is None or targets is None:
                continue
            value = tomllib.loads(f"v = {literal.group(1)}")["v"]
            for target in targets if isinstance(targets, tuple) else (targets,):
                if hasattr(target, key):
                    compared += 1
                    assert _same(value, getattr(target, key)), \
                        f"[{section}] {key}: documented {value!r}, the loader gives {getattr(target, key)!r}"
    assert compared > 60
