"""``pdp revoke``, ``pdp unrevoke`` and ``pdp certs list`` as a user runs them, against a running ``pdp serve``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import REDIS_URL
from servers import free_port, wait_for

PDP = str(Path(sys.executable).parent / "pdp")
ALLOW_ALL = 'package pdp.authz\nimport rego.v1\nresult := {"allowed": true}\n'


def pdp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PDP, *args], capture_output=True, text=True, timeout=120, check=False)


def _setup(write_setup, tmp_path: Path, store: str = "") -> Path:
    (tmp_path / "allow.rego").write_text(ALLOW_ALL)
    return write_setup(engine="regorus", policy_paths=[str(tmp_path / "allow.rego")], extra=store)


@pytest.mark.parametrize("command", [["revoke", "cert", "A" * 43], ["revoke", "token", "j1"],
                                     ["revoke", "subject", "spiffe://example.org/x"], ["revoke", "list"],
                                     ["unrevoke", "token", "j1"], ["certs", "list"]])
def test_without_a_shared_store_the_commands_say_so_and_change_nothing(write_setup, tmp_path, command):
    config = _setup(write_setup, tmp_path)
    result = pdp(*command, "--config", str(config))
    assert result.returncode == 2
    assert "store.url is not set" in result.stderr and "admin endpoint" in result.stderr
    assert result.stdout == ""


def test_bad_values_and_durations_are_refused(write_setup, tmp_path, prefix):
    config = _setup(write_setup, tmp_path, f'[store]\nurl = "{REDIS_URL}"\nprefix = "{prefix}"\n')
    result = pdp("revoke", "cert", "not-a-thumbprint", "--config", str(config))
    assert result.returncode == 2 and "x5t#S256" in result.stderr
    result = pdp("revoke", "token", "j1", "--ttl", "soon", "--config", str(config))
    assert result.returncode == 2 and "not a duration" in result.stderr
    result = pdp("unrevoke", "token", "never-revoked", "--config", str(config))
    assert result.returncode == 1 and "not on the revocation list" in result.stderr


def test_redis_down_is_an_error_not_a_success(write_setup, tmp_path):
    config = _setup(write_setup, tmp_path, f'[store]\nurl = "redis://127.0.0.1:{free_port()}/0"\n')
    result = pdp("revoke", "token", "j1", "--config", str(config))
    assert result.returncode == 2 and "did not answer" in result.stderr and "nothing was changed" in result.stderr


def _check(url: str, pem: str) -> dict[str, object]:
    response = httpx.post(f"{url}/v1/check", json={"method": "GET", "path": "/orders", "host": "api.test",
                                                   "client_cert": pem}, timeout=10)
    doc: dict[str, object] = response.json()
    return doc


def _until_reason(url: str, pem: str, reason: str, deadline: float = 10.0) -> float:
    started = time.monotonic()
    while (got := _check(url, pem)["reason"]) != reason:
        assert time.monotonic() - started < deadline, f"still {got!r} after {deadline} s"
        time.sleep(0.02)
    return time.monotonic() - started


def test_pdp_revoke_reaches_a_running_pdp_serve_through_redis(write_setup, tmp_path, pki, prefix):
    config = _setup(write_setup, tmp_path, f'[store]\nurl = "{REDIS_URL}"\nprefix = "{prefix}"\n')
    (tmp_path / "client.pem").write_text(pki.client.pem.decode())
    port = free_port()
    server = subprocess.Popen([PDP, "serve", "--config", str(config), "--http", f"127.0.0.1:{port}", "--grpc", ""],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/healthz")
        chain = pki.chain_pem()
        assert _check(url, chain)["allowed"] is True

        result = pdp("revoke", "cert", str(tmp_path / "client.pem"), "--reason", "laptop stolen",
                     "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert pki.client.thumbprint in result.stdout and "permanently" in result.stdout
        assert _until_reason(url, chain, "cert_revoked") < 1.0
        assert _check(url, pki.chain_pem(pki.other))["allowed"] is True

        result = pdp("revoke", "subject", "spiffe://example.org/demo/other", "--ttl", "1h", "--config", str(config))
        assert result.returncode == 0, result.stderr
        _until_reason(url, pki.chain_pem(pki.other), "subject_revoked")

        listed = pdp("revoke", "list", "--json", "--config", str(config))
        assert listed.returncode == 0, listed.stderr
        entries = {(e["kind"], e["value"]): e for e in json.loads(listed.stdout)}
        assert entries[("cert", pki.client.thumbprint)]["reason"] == "laptop stolen"
        assert entries[("cert", pki.client.thumbprint)]["expires"] is None
        other = entries[("subject", "spiffe://example.org/demo/other")]
        assert other["expires"] is not None and 3500 < other["expires"] - time.time() <= 3600
        table = pdp("revoke", "list", "--config", str(config)).stdout
        assert table.splitlines()[0].split()[:2] == ["KIND", "VALUE"] and "laptop stolen" in table

        # A base64url thumbprint may begin with '-': after '--' it is never read as an option.
        result = pdp("unrevoke", "cert", "--config", str(config), "--", pki.client.thumbprint)
        assert result.returncode == 0, result.stderr
        _until_reason(url, chain, "allowed")

        ready = httpx.get(f"{url}/readyz", timeout=10).json()
        assert ready["revocations"]["loaded"] is True and ready["revocations"]["entries"] == 1

        # The inventory saw both clients (written within the flush interval, 2 s).
        deadline = time.monotonic() + 15
        while len(listing := json.loads(pdp("certs", "list", "--json", "--config", str(config)).stdout)) < 2:
            assert time.monotonic() < deadline, listing
            time.sleep(0.2)
        assert {r["spiffe_id"] for r in listing} == {"spiffe://example.org/demo/client",
                                                     "spiffe://example.org/demo/other"}
        while httpx.get(f"{url}/readyz", timeout=10).json()["identities"] != 2:  # counted every 5 s
            assert time.monotonic() < deadline + 10
            time.sleep(0.2)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        _, err = server.communicate(timeout=20)
        assert b"Traceback" not in err, err.decode()


def test_a_pem_file_revokes_its_one_certificate_that_is_not_a_ca_or_is_refused(write_setup, tmp_path, pki, prefix):
    config = _setup(write_setup, tmp_path, f'[store]\nurl = "{REDIS_URL}"\nprefix = "{prefix}"\n')
    ca_first = tmp_path / "ca-first.pem"
    ca_first.write_bytes(pki.intermediate.pem + pki.client.pem)
    result = pdp("revoke", "cert", str(ca_first), "--config", str(config))
    assert result.returncode == 0 and pki.client.thumbprint in result.stdout, result.stderr
    for name, content in (("ca.pem", pki.intermediate.pem + pki.root.pem), ("two.pem", pki.client.pem + pki.other.pem)):
        (tmp_path / name).write_bytes(content)
        result = pdp("revoke", "cert", str(tmp_path / name), "--config", str(config))
        assert result.returncode == 2 and "not CAs" in result.stderr and "Traceback" not in result.stderr, name
    listed = json.loads(pdp("revoke", "list", "--json", "--config", str(config)).stdout)
    assert [e["value"] for e in listed] == [pki.client.thumbprint]


def test_a_whole_jwt_or_a_reason_with_control_characters_is_refused_with_exit_2(write_setup, tmp_path, pki, issuer,
                                                                                prefix):
    from conftest import bound_token

    config = _setup(write_setup, tmp_path, f'[store]\nurl = "{REDIS_URL}"\nprefix = "{prefix}"\n')
    result = pdp("revoke", "token", bound_token(issuer, pki.client), "--config", str(config))
    assert result.returncode == 2 and "its jti claim is" in result.stderr
    result = pdp("revoke", "token", issuer.mint(extra={"jti": None}), "--config", str(config))
    assert result.returncode == 2 and "revoke subject" in result.stderr
    result = pdp("revoke", "token", "j1", "--reason", "rotation\nWARNING forged line", "--config", str(config))
    assert result.returncode == 2 and "control characters" in result.stderr
    assert json.loads(pdp("revoke", "list", "--json", "--config", str(config)).stdout) == []


def test_a_thumbprint_that_begins_with_a_dash_is_read_after_double_dash(tmp_path, prefix):
    """One x5t#S256 in 64 begins with '-' (base64url): written after '--' it is the value, not an option."""
    config = tmp_path / "pdp.toml"
    config.write_text(f'[store]\nurl = "{REDIS_URL}"\nprefix = "{prefix}"\n')
    thumbprint = "-" + "A" * 42
    result = pdp("revoke", "cert", "--config", str(config), "--", thumbprint)
    assert result.returncode == 0, result.stderr
    assert thumbprint in pdp("revoke", "list", "--config", str(config)).stdout
    result = pdp("unrevoke", "cert", "--config", str(config), "--", thumbprint)
    assert result.returncode == 0, result.stderr
