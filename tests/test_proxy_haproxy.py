"""The real HAProxy in front of pdp, run from examples/haproxy (pdp_auth.lua, then mutual TLS to pdp)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from proxies import (
    EXAMPLES,
    PROXY_PORT,
    ProxyContract,
    Stack,
    pdp_and_upstream,
    render,
    require_binary,
    running,
)

pytestmark = pytest.mark.integration

EXAMPLE = EXAMPLES / "haproxy"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    haproxy = require_binary("haproxy")
    tmp = tmp_path_factory.mktemp("haproxy")
    with pdp_and_upstream(tmp, EXAMPLE) as behind:
        # HAProxy reads a certificate and its key from one file.
        for combined, name in (("haproxy.pem", "envoy"), ("haproxy-gateway.pem", "gateway")):
            (tmp / combined).write_bytes((tmp / f"{name}.pem").read_bytes() + (tmp / f"{name}.key").read_bytes())
        cfg = render(EXAMPLE / "haproxy.cfg", tmp / "haproxy.cfg", {
            **behind.replacements, f"bind :{PROXY_PORT} ": f"bind 127.0.0.1:{behind.port} ",
            "/etc/haproxy/pdp_auth.lua": str(EXAMPLE / "pdp_auth.lua"),
            "/run/haproxy/pdp-authz.sock": f"{tmp}/pdp-authz.sock",
        })
        argv = [haproxy, "-db", "-f", str(cfg)]
        with running(argv, port=behind.port, log=tmp / "haproxy.out", cwd=tmp):
            yield Stack("haproxy", behind.port, behind.setup)


class TestHaproxy(ProxyContract):
    def test_a_deny_is_pdps_own_answer(self, stack: Stack) -> None:
        reply = stack.request("/public/%2e%2e/admin", token=stack.setup.token())
        assert reply.status == 400, str(reply)
        assert reply.json()["reason"] == "request_invalid"
        assert reply.header("x-pdp-reason") == "request_invalid"

    def test_every_x_pdp_header_a_client_sends_is_dropped(self, stack: Stack) -> None:
        seen = stack.request("/orders", token=stack.setup.token(), headers=[("X-Pdp-Role", "admin")]).upstream
        assert seen is not None and seen.header("x-pdp-role") is None
