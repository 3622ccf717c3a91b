"""The real Caddy in front of pdp, run from examples/caddy (forward_auth to pdp over mutual TLS)."""

from __future__ import annotations

import os
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

EXAMPLE = EXAMPLES / "caddy"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    caddy = require_binary("caddy")
    tmp = tmp_path_factory.mktemp("caddy")
    with pdp_and_upstream(tmp, EXAMPLE) as behind:
        caddyfile = render(EXAMPLE / "Caddyfile", tmp / "Caddyfile", {
            **behind.replacements, f"https://:{PROXY_PORT} {{": f"https://:{behind.port} {{\n\tbind 127.0.0.1",
            "admin localhost:2019": "admin off",
        })
        # Caddy keeps its state under $HOME / $XDG_*: keep it in the temp folder.
        env = {**os.environ, "HOME": str(tmp), "XDG_CONFIG_HOME": str(tmp / "config"),
               "XDG_DATA_HOME": str(tmp / "data")}
        argv = [caddy, "run", "--config", str(caddyfile), "--adapter", "caddyfile"]
        with running(argv, port=behind.port, log=tmp / "caddy.out", cwd=tmp, env=env):
            yield Stack("caddy", behind.port, behind.setup)


class TestCaddy(ProxyContract):
    def test_a_deny_is_pdps_own_answer(self, stack: Stack) -> None:
        reply = stack.request("/public/%2e%2e/admin", token=stack.setup.token())
        assert reply.status == 400, str(reply)
        assert reply.json()["reason"] == "request_invalid"
        assert reply.header("x-pdp-reason") == "request_invalid"

    def test_every_x_pdp_header_a_client_sends_is_dropped(self, stack: Stack) -> None:
        seen = stack.request("/orders", token=stack.setup.token(), headers=[("X-Pdp-Role", "admin")]).upstream
        assert seen is not None and seen.header("x-pdp-role") is None
