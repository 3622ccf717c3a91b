"""Shared fixtures: a real PKI, a real token issuer, and configs written to a temp folder.

Everything is generated here with ``cryptography``; nothing is pasted in.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import redis

from pdp.assemble import build_pdp
from pdp.config import Config, load_config
from pdp.devpki import Issued, TokenIssuer, make_ca, make_client
from pdp.pipeline import Pdp
from pdp.request import CheckRequest

ISSUER = "https://issuer.test"
AUDIENCE = "https://api.test"
CLIENT_ID = "spiffe://example.org/demo/client"


@dataclass(frozen=True)
class Pki:
    root: Issued
    intermediate: Issued
    client: Issued       # spiffe://example.org/demo/client, issued by the intermediate
    other: Issued        # spiffe://example.org/demo/other, issued by the intermediate
    admin: Issued        # spiffe://example.org/admin/ops, issued by the intermediate

    def chain(self, leaf: Issued | None = None) -> tuple[bytes, ...]:
        """Leaf first, then the intermediate (the root is in the trust bundle)."""
        return ((leaf or self.client).der, self.intermediate.der)

    def chain_pem(self, leaf: Issued | None = None) -> str:
        return ((leaf or self.client).pem + self.intermediate.pem).decode()


@pytest.fixture(scope="session")
def pki() -> Pki:
    root = make_ca("test root")
    inter = make_ca("test intermediate", issuer=root, path_length=0)
    return Pki(
        root=root,
        intermediate=inter,
        client=make_client(inter, spiffe_id=CLIENT_ID),
        other=make_client(inter, spiffe_id="spiffe://example.org/demo/other"),
        admin=make_client(inter, spiffe_id="spiffe://example.org/admin/ops"),
    )


@pytest.fixture(scope="session")
def issuer() -> TokenIssuer:
    return TokenIssuer.generate(ISSUER, kid="k1")


def bound_token(issuer: TokenIssuer, leaf: Issued, **kw: Any) -> str:
    kw.setdefault("audience", AUDIENCE)
    kw.setdefault("scope", "read write")
    return issuer.mint(bound_to=leaf, **kw)


@pytest.fixture(params=["regopy", "regorus"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


SetupWriter = Callable[..., Path]


@pytest.fixture
def write_setup(tmp_path: Path, pki: Pki, issuer: TokenIssuer) -> SetupWriter:
    """Write ca.pem, jwks.json and pdp.toml into tmp_path; return the config path.

    Keyword arguments: ``engine``, ``require_bound`` (default True), ``policy_paths``
    (default: the shipped policy), ``extra`` (TOML text appended), ``issuer_extra`` (TOML
    lines inside the issuer table).
    """

    def write(*, engine: str = "regopy", require_bound: bool = True, policy_paths: list[str] | None = None,
              extra: str = "", issuer_extra: str = "", reload_interval: float = 0.0) -> Path:
        (tmp_path / "ca.pem").write_bytes(pki.root.pem)
        # Gateways like Envoy hand over only the leaf: the bundle knows the intermediate.
        (tmp_path / "intermediates.pem").write_bytes(pki.intermediate.pem)
        (tmp_path / "jwks.json").write_text(json.dumps(issuer.jwks))
        paths = "" if policy_paths is None else f"paths = {json.dumps(policy_paths)}\n"
        text = f"""
[server]
http = "127.0.0.1:0"
grpc = "127.0.0.1:0"
reload_interval = {reload_interval}

[policy]
engine = "{engine}"
{paths}
[[certificates.trust_bundles]]
name = "example.org"
file = "ca.pem"
intermediates = "intermediates.pem"
trust_domain = "example.org"

[tokens]
require_bound = {str(require_bound).lower()}

[[tokens.issuers]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
algorithms = ["ES256", "RS256", "PS256", "EdDSA"]
jwks_file = "jwks.json"
{issuer_extra}
{extra}
"""
        path = tmp_path / "pdp.toml"
        path.write_text(text)
        return path

    return write


@pytest.fixture
def make_pdp(write_setup: SetupWriter) -> Callable[..., Pdp]:
    """A real Pdp built from a written config (``probe=False``: the probe has its own tests)."""

    def make(**kw: Any) -> Pdp:
        config: Config = load_config(write_setup(**kw))
        return build_pdp(config, probe=False)

    return make


def check_request(*, chain: tuple[bytes, ...] = (), token: str | None = None, method: str = "GET",
                  path: str = "/orders", headers: dict[str, str] | None = None,
                  now: float | None = None) -> CheckRequest:
    h = dict(headers or {})
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    return CheckRequest(method=method, path=path, host="api.test", time=now if now is not None else time.time(),
                        headers=MappingProxyType(h), client_cert_chain=chain)


CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


@pytest.fixture(scope="session")
def corpora() -> Path:
    """shared/corpora beside the checkout; missing is a failure in CI, a skip elsewhere."""
    if not CORPORA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"external test corpora missing at {CORPORA}")
        pytest.skip(f"external test corpora not found at {CORPORA}")
    return CORPORA


#: The shared Redis this kind of machine runs; tests use their own key prefix on it (``prefix``).
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix() -> Any:
    """A key prefix of this test's own on the shared Redis; its keys are deleted afterwards (never FLUSHALL)."""
    value = f"pdp-test:{uuid.uuid4().hex}:"
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=value + "*"))
    if keys:
        client.delete(*keys)
    client.close()
