"""The real Caddy in front of pdp, run from examples/caddy (forward_auth to pdp over mutual TLS)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from proxies import (
    APP_ADDRESS,
    EXAMPLES,
    PDP_ADDRESS,
    PROXY_PORT,
    SETUP_DIR,
    EchoUpstream,
    ProxyContract,
    Stack,
    render,
    require_binary,
    running,
    write_setup,
)
from servers import free_port, serve_pdp

from pdp.config import load_config

pytestmark = pytest.mark.integration

EXAMPLE = EXAMPLES / "caddy"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    caddy = require_binary("caddy")
    tmp = tmp_path_factory.mktemp("caddy")
    setup = write_setup(tmp)
    config = render(EXAMPLE / "pdp.toml", tmp / "pdp.toml", {SETUP_DIR: f"{tmp}/"})
    with serve_pdp(load_config(config)) as (pdp_url, _), EchoUpstream() as app:
        port = free_port()
        caddyfile = render(EXAMPLE / "Caddyfile", tmp / "Caddyfile", {
            SETUP_DIR: f"{tmp}/", PDP_ADDRESS: pdp_url.removeprefix("https://"),
            APP_ADDRESS: f"127.0.0.1:{app.port}",
            f"https://:{PROXY_PORT} {{": f"https://:{port} {{\n\tbind 127.0.0.1",
            "admin localhost:2019": "admin off",
        })
        # Caddy keeps its state under $HOME / $XDG_*: keep it in the temp folder.
        env = {**os.environ, "HOME": str(tmp), "XDG_CONFIG_HOME": str(tmp / "config"),
               "XDG_DATA_HOME": str(tmp / "data")}
        argv = [caddy, "run", "--config", str(caddyfile), "--adapter", "caddyfile"]
        with running(argv, port=port, log=tmp / "caddy.out", cwd=tmp, env=env):
            yield Stack("caddy", port, setup)


class TestCaddy(ProxyContract):
    def test_a_deny_is_pdps_own_answer(self, stack: Stack) -> None:
        reply = stack.request("/public/%2e%2e/admin", token=stack.setup.token())
        assert reply.status == 400, str(reply)
        assert reply.json()["reason"] == "request_invalid"
        assert reply.header("x-pdp-reason") == "request_invalid"

    def test_every_x_pdp_header_a_client_sends_is_dropped(self, stack: Stack) -> None:
        seen = stack.request("/orders", token=stack.setup.token(), headers=[("X-Pdp-Role", "admin")]).upstream
        assert seen is not None and seen.header("x-pdp-role") is None
