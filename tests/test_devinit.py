"""``pdp dev init``: what it writes must be as safe as what pdp ships, and its commands must work when pasted."""

from __future__ import annotations

import time
from pathlib import Path
from types import MappingProxyType

import pytest

from pdp.assemble import build_pdp
from pdp.certificates.pem import pem_to_der_chain
from pdp.config import load_config
from pdp.devinit import dev_init
from pdp.policy.engine import load_bundle
from pdp.policy.testing import run_tests
from pdp.request import CheckRequest


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("devinit") / "dev"
    dev_init(target)
    return target


def test_dev_init_policy_passes_the_shipped_rego_tests(dev: Path) -> None:
    bundle = load_bundle([dev / "policy"], entrypoint="data", engine="regorus", include_tests=True)
    results = run_tests(bundle)
    assert len(results) >= 10
    assert [(r.name, r.outcome) for r in results if r.outcome != "PASS"] == []


@pytest.mark.parametrize("method", ["TRACE", "OPTIONS", "CONNECT", "FOO"])
def test_dev_init_setup_denies_a_method_no_route_covers(dev: Path, method: str) -> None:
    pdp = build_pdp(load_config(dev / "pdp.toml"))
    try:
        token = (dev / "token.jwt").read_text().strip()

        def ask(method: str) -> tuple[bool, str]:
            decision = pdp.decide(CheckRequest(
                method=method, path="/orders", host="api.example.org", time=time.time(),
                headers=MappingProxyType({"authorization": f"Bearer {token}"}),
                client_cert_chain=pem_to_der_chain((dev / "client.pem").read_bytes())))
            return decision.allowed, decision.reason

        assert ask("GET") == (True, "allowed")  # the demo token is good: only the method is refused
        assert ask(method) == (False, "policy_denied")
    finally:
        pdp.close()
