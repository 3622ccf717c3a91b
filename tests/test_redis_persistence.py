"""The Redis pdp ships (compose.yaml, deploy/kubernetes/redis.yaml), run with the shipped arguments: a
revocation written through pdp outlives Redis being killed (no shutdown, no last save) and started again on
the same data folder, and a replica that starts afterwards denies the revoked certificate.

A real ``redis-server`` of the test's own with the shipped command line, adapted to this machine only
where it must be: a free loopback port, and a folder of the test's in place of the volume.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
import yaml
from conftest import check_request
from servers import free_port

from pdp.certificates.revocation_list import Revocation, read_revocations, store_revocation
from pdp.config import load_config
from pdp.service.server import Service
from pdp.store import RedisStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def shipped_args(where: str) -> list[str]:
    """The redis-server command line of compose.yaml or of the Kubernetes base's StatefulSet."""
    if where == "compose.yaml":
        return [str(a) for a in yaml.safe_load((ROOT / where).read_text("utf-8"))["services"]["redis"]["command"]]
    (statefulset,) = [d for d in yaml.safe_load_all((ROOT / where).read_text("utf-8"))
                      if d and d["kind"] == "StatefulSet" and d["metadata"]["name"] == "redis"]
    (container,) = [c for c in statefulset["spec"]["template"]["spec"]["containers"] if c["name"] == "redis"]
    return [str(a) for a in container["args"]]


class ShippedRedis:
    """``redis-server`` with the shipped arguments, its ``--dir`` moved to ``folder``, on a free port."""

    def __init__(self, args: list[str], folder: Path) -> None:
        assert args[0] == "redis-server" and "--dir" in args, args
        self.args = list(args)
        self.args[self.args.index("--dir") + 1] = str(folder)
        self.port = free_port()
        self.args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed (CI installs it: see .ci/run)"
        self.proc = subprocess.Popen([binary, *self.args[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        deadline = time.monotonic() + 20
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.BusyLoadingError:  # reading its append-only file back
                    time.sleep(0.05)
                except redis.ConnectionError:
                    assert time.monotonic() < deadline and self.proc.poll() is None, "redis-server did not start"
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: what a node failure or an OOM kill does (no shutdown, no last save)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.mark.parametrize("where", ["compose.yaml", "deploy/kubernetes/redis.yaml"])
def test_a_revocation_outlives_a_killed_redis_run_as_shipped(where, tmp_path, pki, write_setup):
    data = tmp_path / "data"
    data.mkdir()
    server = ShippedRedis(shipped_args(where), data)
    server.start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        try:
            store_revocation(RedisStore(server.url, client=client),
                             Revocation("cert", pki.client.thumbprint, "key compromise", time.time()))
        finally:
            client.close()
        server.kill()
        server.start()
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        try:
            _, entries = read_revocations(RedisStore(server.url, client=client))
        finally:
            client.close()
        assert [(e.kind, e.value) for e in entries] == [("cert", pki.client.thumbprint)], f"{where}: {entries}"
        config = load_config(write_setup(engine="regorus", extra=f'[store]\nurl = "{server.url}"\ntimeout = 1\n'))
        service = Service(config)
        try:
            assert service.pdp.decide(check_request(chain=pki.chain())).reason == "cert_revoked"
        finally:
            service.stop()
    finally:
        server.kill()
