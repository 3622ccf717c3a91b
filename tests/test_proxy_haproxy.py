"""The real HAProxy in front of pdp, run from examples/haproxy (pdp_auth.lua, then mutual TLS to pdp)."""

from __future__ import annotations

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

EXAMPLE = EXAMPLES / "haproxy"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    haproxy = require_binary("haproxy")
    tmp = tmp_path_factory.mktemp("haproxy")
    setup = write_setup(tmp)
    # HAProxy reads a certificate and its key from one file.
    for combined, name in (("haproxy.pem", "envoy"), ("haproxy-gateway.pem", "gateway")):
        (tmp / combined).write_bytes((tmp / f"{name}.pem").read_bytes() + (tmp / f"{name}.key").read_bytes())
    config = render(EXAMPLE / "pdp.toml", tmp / "pdp.toml", {SETUP_DIR: f"{tmp}/"})
    with serve_pdp(load_config(config)) as (pdp_url, _), EchoUpstream() as app:
        port = free_port()
        cfg = render(EXAMPLE / "haproxy.cfg", tmp / "haproxy.cfg", {
            SETUP_DIR: f"{tmp}/", PDP_ADDRESS: pdp_url.removeprefix("https://"),
            APP_ADDRESS: f"127.0.0.1:{app.port}", f"bind :{PROXY_PORT} ": f"bind 127.0.0.1:{port} ",
            "/etc/haproxy/pdp_auth.lua": str(EXAMPLE / "pdp_auth.lua"),
            "/run/haproxy/pdp-authz.sock": f"{tmp}/pdp-authz.sock",
        })
        argv = [haproxy, "-db", "-f", str(cfg)]
        with running(argv, port=port, log=tmp / "haproxy.out", cwd=tmp):
            yield Stack("haproxy", port, setup)


class TestHaproxy(ProxyContract):
    def test_a_deny_is_pdps_own_answer(self, stack: Stack) -> None:
        reply = stack.request("/public/%2e%2e/admin", token=stack.setup.token())
        assert reply.status == 400, str(reply)
        assert reply.json()["reason"] == "request_invalid"
        assert reply.header("x-pdp-reason") == "request_invalid"

    def test_every_x_pdp_header_a_client_sends_is_dropped(self, stack: Stack) -> None:
        seen = stack.request("/orders", token=stack.setup.token(), headers=[("X-Pdp-Role", "admin")]).upstream
        assert seen is not None and seen.header("x-pdp-role") is None
