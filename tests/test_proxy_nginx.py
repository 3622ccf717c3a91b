"""The real nginx in front of pdp, run from examples/nginx (auth_request to pdp over mutual TLS)."""

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

EXAMPLE = EXAMPLES / "nginx"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    nginx = require_binary("nginx")
    tmp = tmp_path_factory.mktemp("nginx")
    with pdp_and_upstream(tmp, EXAMPLE) as behind:
        for name in ("logs", "temp"):
            (tmp / name).mkdir()
        temp_paths = "".join(f"    {kind}_temp_path {tmp}/temp/{kind};\n"
                             for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = render(EXAMPLE / "nginx.conf", tmp / "nginx.conf", {
            **behind.replacements, f"listen {PROXY_PORT} ": f"listen 127.0.0.1:{behind.port} ",
            "/run/nginx-pdp.pid": f"{tmp}/nginx.pid", "/var/log/nginx/": f"{tmp}/logs/",
            "http {\n": "http {\n" + temp_paths,
        })
        # Started as root, nginx runs its workers as nobody, who cannot enter the private temp folder.
        user = " user root;" if os.geteuid() == 0 else ""
        argv = [nginx, "-p", f"{tmp}/", "-c", str(conf), "-e", f"{tmp}/logs/startup.log", "-g", f"daemon off;{user}"]
        with running(argv, port=behind.port, log=tmp / "nginx.out", cwd=tmp):
            yield Stack("nginx", behind.port, behind.setup)


class TestNginx(ProxyContract):
    def test_a_deny_names_the_real_reason_to_the_client(self, stack: Stack) -> None:
        reply = stack.request("/orders", cert="other", token=stack.setup.token())
        assert reply.status == 401
        assert reply.header("x-pdp-reason") == "binding_mismatch"
        assert reply.header("x-pdp-decision-id")
        assert len(reply.all("www-authenticate")) == 1, str(reply)

    def test_a_malformed_request_is_answered_400_with_its_reason(self, stack: Stack) -> None:
        reply = stack.request("/public/%2e%2e/admin", token=stack.setup.token())
        assert reply.status == 400, str(reply)
        assert reply.header("x-pdp-reason") == "request_invalid"
        assert reply.json()["reason"] == "request_invalid"
