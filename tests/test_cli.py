"""The ``pdp`` command as a user runs it: real processes, real files, a real server for the quick start."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from servers import free_port, wait_for

from pdp.devinit import FILES, curl_command

PDP = str(Path(sys.executable).parent / "pdp")


def pdp(*args: str, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PDP, *args], input=stdin.decode() if stdin else None, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("dev") / "dev"
    result = pdp("dev", "init", str(target))
    assert result.returncode == 0, result.stderr
    return target


def test_dev_init_writes_a_complete_setup_referring_only_to_its_folder(dev):
    for name in FILES:
        assert (dev / name).is_file(), name
    assert (dev / "policy" / "zero_trust.rego").is_file()
    assert oct((dev / "client.key").stat().st_mode & 0o777) == "0o600"
    config = tomllib.loads((dev / "pdp.toml").read_text())
    files = [config["policy"]["paths"][0], config["certificates"]["trust_bundles"][0]["file"],
             config["tokens"]["issuers"][0]["jwks_file"]]
    for f in files:
        assert not Path(f).is_absolute() and (dev / f).exists()
    client = x509.load_pem_x509_certificate((dev / "client.pem").read_bytes())
    sans = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/demo/client"]


def test_dev_init_refuses_to_overwrite(dev):
    result = pdp("dev", "init", str(dev))
    assert result.returncode == 2 and "exists" in result.stderr


def test_check_exit_status_is_0_for_allow_1_for_deny_2_for_error(dev, tmp_path):
    allow = pdp("check", "--config", str(dev / "pdp.toml"), "--cert", str(dev / "client.pem"),
                "--token", str(dev / "token.jwt"), "--method", "GET", "--path", "/orders")
    assert allow.returncode == 0, allow.stdout + allow.stderr
    assert allow.stdout.startswith("ALLOW 200 allowed")
    deny = pdp("check", "--config", str(dev / "pdp.toml"), "--cert", str(dev / "other.pem"),
               "--token", str(dev / "token.jwt"), "--path", "/orders")
    assert deny.returncode == 1
    assert "DENY 401 binding_mismatch" in deny.stdout and "FAIL binding" in deny.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[tokens]\nleway = 3\n")
    error = pdp("check", "--config", str(bad), "--path", "/")
    assert error.returncode == 2
    assert "tokens.leway: unknown key (did you mean 'leeway'?)" in error.stderr
    assert "Traceback" not in error.stderr


def test_check_prints_json_on_request(dev):
    result = pdp("check", "--config", str(dev / "pdp.toml"), "--cert", str(dev / "client.pem"), "--json",
                 "--path", "/orders")
    assert result.returncode == 1
    assert json.loads(result.stdout)["reason"] == "token_required"


def test_cert_inspect_shows_the_rfc8705_thumbprint(dev):
    result = pdp("cert", "inspect", str(dev / "client.pem"))
    assert result.returncode == 0
    der = x509.load_pem_x509_certificate((dev / "client.pem").read_bytes()).public_bytes(
        __import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.DER)
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert f"x5t#S256 (RFC 8705): {expected}" in result.stdout
    assert "spiffe://example.org/demo/client" in result.stdout
    verified = pdp("cert", "inspect", str(dev / "client.pem"), "--config", str(dev / "pdp.toml"), "--json")
    assert json.loads(verified.stdout)["verification"] == "verified by trust bundle 'example.org'"


def test_cert_inspect_of_garbage_is_an_error_not_a_traceback(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnope\n")
    result = pdp("cert", "inspect", str(junk))
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_token_inspect_with_and_without_verification(dev, tmp_path):
    plain = pdp("token", "inspect", str(dev / "token.jwt"))
    out = json.loads(plain.stdout)
    assert out["header"]["typ"] == "at+jwt"
    assert out["claims"]["cnf"]["x5t#S256"]
    assert out["signature"].startswith("not checked")
    verified = pdp("token", "inspect", "--config", str(dev / "pdp.toml"), stdin=(dev / "token.jwt").read_bytes())
    assert verified.returncode == 0
    assert json.loads(verified.stdout)["signature"].startswith("good")
    assert json.loads(verified.stdout)["verdict"].startswith("valid")
    header, claims, sig = (dev / "token.jwt").read_text().strip().split(".")
    forged = tmp_path / "forged.jwt"
    forged.write_text(f"{header}.{claims}.{sig[:-4]}AAAA")
    bad = pdp("token", "inspect", str(forged), "--config", str(dev / "pdp.toml"))
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["signature"].startswith("BAD")
    assert json.loads(bad.stdout)["verdict"].startswith("INVALID token_signature_invalid")


def test_policy_test_runs_the_shipped_tests_like_opa_test():
    result = pdp("policy", "test")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().startswith("PASS: ")
    passed, total = result.stdout.strip().split()[1].split("/")
    assert passed == total and int(total) >= 10


def test_policy_test_reports_failures_with_exit_1(tmp_path):
    (tmp_path / "p.rego").write_text("package t\nimport rego.v1\ntest_ok if true\ntest_bad if false\n")
    result = pdp("policy", "test", str(tmp_path), "--engine", "regorus")
    assert result.returncode == 1
    assert "data.t.test_bad: FAIL" in result.stdout and "PASS: 1/2" in result.stdout


def _serve(*args: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PDP, "serve", *args, "--http", f"127.0.0.1:{port}", "--grpc", "127.0.0.1:0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert b"Traceback" not in err, err.decode()


def test_the_quick_start_curl_commands_show_an_allow_and_a_deny(dev):
    port = free_port()
    server = _serve("--config", str(dev / "pdp.toml"), port=port)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz")
        answers = []
        for cert in ("client.pem", "other.pem"):
            cmd = curl_command(dev, cert, f"127.0.0.1:{port}")
            out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30, check=True)
            answers.append(json.loads(out.stdout))
    finally:
        _stop(server)
    assert (answers[0]["allowed"], answers[0]["reason"]) == (True, "allowed")
    assert (answers[1]["allowed"], answers[1]["reason"]) == (False, "binding_mismatch")


def test_serve_runs_on_embedded_defaults_without_a_config():
    port = free_port()
    server = _serve(port=port)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/healthz")
        assert httpx.get(f"{base}/readyz").json()["ready"] is True
        public = httpx.post(f"{base}/v1/check", json={"method": "GET", "path": "/healthz"}).json()
        private = httpx.post(f"{base}/v1/check", json={"method": "GET", "path": "/orders"}).json()
    finally:
        _stop(server)
    assert public["allowed"] is True
    assert (private["allowed"], private["reason"]) == (False, "cert_required")


def test_serve_with_a_bad_config_names_the_key_and_exits_2(tmp_path):
    bad = tmp_path / "pdp.toml"
    bad.write_text('[[tokens.issuers]]\nissuer = "https://x"\naudiences = ["a"]\nalgorithms = ["none"]\n'
                   'jwks_file = "j.json"\n')
    result = pdp("serve", "--config", str(bad), timeout=60)
    assert result.returncode == 2
    assert "tokens.issuers[0].algorithms" in result.stderr and "Traceback" not in result.stderr


def test_serve_with_two_workers_answers_on_both_listeners(dev):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    http_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([PDP, "serve", "--config", str(dev / "pdp.toml"), "--workers", "2",
                             "--http", f"127.0.0.1:{http_port}", "--grpc", f"127.0.0.1:{grpc_port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{http_port}/healthz", timeout=60)
        answers = [httpx.post(f"http://127.0.0.1:{http_port}/v1/check",
                              json={"method": "GET", "path": "/healthz"}).json()["allowed"] for _ in range(6)]
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert answers == [True] * 6
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert err.decode().count("gRPC ext_authz listening") == 2  # one listener per worker, one port
    assert len([line for line in out.decode().splitlines() if '"decision_id"' in line]) == 6


# -- what the workers of one `pdp serve --workers 2` must share: the DPoP replay store and nonce secret


def _serve_workers(config: Path, port: int, tmpdir: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TMPDIR=str(tmpdir))  # where the parent makes its private state folder
    return subprocess.Popen([PDP, "serve", "--config", str(config), "--workers", "2", "--http", f"127.0.0.1:{port}",
                             "--grpc", ""], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _decisions_by_worker(base: str) -> set[tuple[str, float]]:
    """(pid, decisions) of each live worker: every scrape reports all workers, each one's share of the
    decisions in ``pdp_worker_decisions{pid}``."""
    seen = set()
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("pdp_worker_decisions{"):
            seen.add((line.split('pid="', 1)[1].split('"', 1)[0], float(line.split()[-1])))
    return seen


def _dpop_check(pki, token: str, proof: str) -> dict:
    return {"method": "GET", "path": "/orders", "host": "api.test", "scheme": "https",
            "headers": {"authorization": f"DPoP {token}", "dpop": proof}, "client_cert": pki.chain_pem()}


def _until_both_workers_answered(base: str, send) -> list[dict]:
    """Call ``send`` (a batch of concurrent checks) until both workers have answered some; bounded."""
    answers: list[dict] = []
    for _ in range(10):
        answers += send()
        workers = [w for w in _decisions_by_worker(base) if w[1] > 0]
        if len(workers) >= 2:
            return answers
    pytest.fail("one worker answered every request: the test proves nothing")


def test_dpop_replay_across_workers_is_allowed_exactly_once(write_setup, pki, issuer, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from conftest import AUDIENCE

    from pdp.devpki import DpopKey

    key = DpopKey.generate()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
    proof = key.proof("GET", "https://api.test/orders", token)
    port = free_port()
    server = _serve_workers(write_setup(engine="regorus"), port, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/healthz", timeout=60)
        (state,) = tmp_path.glob("pdp-workers-*")
        assert oct(state.stat().st_mode & 0o777) == "0o700"

        def send() -> list[dict]:
            with ThreadPoolExecutor(8) as pool:
                return list(pool.map(lambda _: httpx.post(f"{base}/v1/check", json=_dpop_check(pki, token, proof))
                                     .json(), range(8)))

        answers = _until_both_workers_answered(base, send)
    finally:
        _stop(server)
    assert [a["allowed"] for a in answers].count(True) == 1
    assert {a["reason"] for a in answers if not a["allowed"]} == {"dpop_proof_invalid"}
    assert not list(tmp_path.glob("pdp-workers-*"))  # the parent removed its state folder at exit


def test_dpop_nonces_of_one_worker_are_good_at_the_other(write_setup, pki, issuer, tmp_path):
    from conftest import AUDIENCE

    from pdp.devpki import DpopKey

    key = DpopKey.generate()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
    config = write_setup(engine="regorus", extra="[dpop]\nrequire_nonce = true\n")  # no nonce_secret
    port = free_port()
    server = _serve_workers(config, port, tmp_path)
    base = f"http://127.0.0.1:{port}"
    url = "https://api.test/orders"
    try:
        wait_for(f"{base}/healthz", timeout=60)
        first = httpx.post(f"{base}/v1/check", json=_dpop_check(pki, token, key.proof("GET", url, token))).json()
        assert first["reason"] == "dpop_nonce_required"
        nonce = first["response_headers"]["dpop-nonce"]

        def send() -> list[dict]:
            return [httpx.post(f"{base}/v1/check", json=_dpop_check(pki, token, key.proof("GET", url, token,
                                                                                           nonce=nonce))).json()
                    for _ in range(8)]

        answers = _until_both_workers_answered(base, send)
    finally:
        _stop(server)
    assert [(a["allowed"], a["reason"]) for a in answers] == [(True, "allowed")] * len(answers)


def _workers(parent: int) -> list[int]:
    """The uvicorn worker processes of a ``pdp serve --workers`` parent (not multiprocessing's tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def test_a_restarted_worker_never_makes_a_store_of_its_own(write_setup, pki, issuer, tmp_path):
    """Once the parent's state file is gone (a temp-folder cleaner), a worker started after that used to
    create a fresh, empty store and accept proofs the others had seen: it must deny store_unavailable, and
    so must the workers that had the file open."""
    import time

    from conftest import AUDIENCE

    from pdp.devpki import DpopKey

    key = DpopKey.generate()
    token = issuer.mint(audience=AUDIENCE, scope="read", dpop_key=key)
    port = free_port()
    server = _serve_workers(write_setup(engine="regorus"), port, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/healthz", timeout=60)
        first = httpx.post(f"{base}/v1/check", json=_dpop_check(pki, token, key.proof(
            "GET", "https://api.test/orders", token))).json()
        assert first["allowed"] is True
        (state,) = tmp_path.glob("pdp-workers-*")
        for leftover in state.iterdir():
            leftover.unlink()
        before = _workers(server.pid)
        assert len(before) == 2
        os.kill(before[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(after := _workers(server.pid)) < 2 or after == before or before[0] in after:
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.2)
        wait_for(f"{base}/healthz", timeout=30)
        time.sleep(2.5)  # the surviving worker looks at its files every 2 s

        def send() -> list[dict]:
            return [httpx.post(f"{base}/v1/check", json=_dpop_check(pki, token, key.proof(
                "GET", "https://api.test/orders", token))).json() for _ in range(8)]

        answers = _until_both_workers_answered(base, send)
    finally:
        _stop(server)
    assert {(a["allowed"], a["reason"]) for a in answers} == {(False, "store_unavailable")}
    assert not state.exists() or list(state.iterdir()) == []  # no worker made a store of its own


def test_workers_stop_when_their_parent_is_killed_and_the_next_parent_removes_its_folder(dev, tmp_path):
    import time

    port = free_port()
    first = _serve_workers(dev / "pdp.toml", port, tmp_path)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", timeout=60)
        workers = _workers(first.pid)
        assert len(workers) == 2
        (stale,) = tmp_path.glob("pdp-workers-*")
        first.kill()  # SIGKILL: no chance to stop the workers or remove the folder
        first.communicate(timeout=10)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                  for pid in workers):
            assert time.monotonic() < deadline, "workers kept serving without their parent"
            time.sleep(0.2)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        assert stale.is_dir()
    finally:
        if first.poll() is None:
            _stop(first)
    second = _serve_workers(dev / "pdp.toml", port, tmp_path)  # the same port is free again
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", timeout=60)
        assert not stale.exists()  # removed: pdp's, and its owner is gone
        assert len(list(tmp_path.glob("pdp-workers-*"))) == 1
    finally:
        _stop(second)
    assert not list(tmp_path.glob("pdp-workers-*"))


def test_only_state_folders_of_dead_pdp_parents_are_removed(tmp_path):
    from pdp.service.workers import STATE_MARK, STATE_OWNER, _process_started, remove_stale_state

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    def folder(name: str, pid: int | None, *, mode: int = 0o700, mark: str = STATE_MARK) -> Path:
        path = tmp_path / name
        path.mkdir(mode=mode)
        path.chmod(mode)
        if pid is not None:
            (path / STATE_OWNER).write_text(json.dumps({"owner": mark, "pid": pid,
                                                        "started": _process_started(pid)}))
        (path / "state.sqlite3").write_bytes(b"")
        return path

    dead = folder("pdp-workers-dead", gone.pid)
    alive = folder("pdp-workers-alive", os.getppid())  # a pdp serve that still runs
    reused = folder("pdp-workers-reused", os.getpid())  # (this process: never its own)
    unmarked = folder("pdp-workers-unmarked", None)  # cannot be proven to be pdp's
    foreign = folder("pdp-workers-foreign", gone.pid, mark="something else")
    shared = folder("pdp-workers-shared", gone.pid, mode=0o755)  # not private: not made by mkdtemp
    other = folder("other-dead", gone.pid)
    link = tmp_path / "pdp-workers-link"
    link.symlink_to(dead)
    assert remove_stale_state(tmp_path) == [dead]
    assert not dead.exists()
    for kept in (alive, reused, unmarked, foreign, shared, other):
        assert kept.is_dir(), kept
    assert link.is_symlink()


# -- pdp serve: taken ports, signals


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("listener", ["http", "grpc"])
def test_serve_on_a_taken_port_names_the_address_and_the_setting_in_one_line(dev, listener, workers):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        ports = {"http": f"127.0.0.1:{free_port()}", "grpc": f"127.0.0.1:{free_port()}", listener: busy}
        result = pdp("serve", "--config", str(dev / "pdp.toml"), "--http", ports["http"], "--grpc", ports["grpc"],
                     "--workers", workers, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no traceback, no "listening" before it
    assert lines[0].startswith(f"pdp: cannot listen on {busy} for {'HTTP' if listener == 'http' else 'gRPC'}: "
                               "address already in use")
    assert f"server.{listener}" in lines[0] and f"--{listener} HOST:PORT" in lines[0]


def _dev_copy(tmp_path: Path) -> Path:
    from pdp.devinit import dev_init

    dev_init(tmp_path / "dev")
    config = tmp_path / "dev" / "pdp.toml"
    config.write_text(config.read_text().replace("reload_interval = 2.0", "reload_interval = 0"))
    return tmp_path / "dev"


def test_sighup_reloads_the_policy_files_and_the_server_keeps_serving(tmp_path):
    import time

    setup = _dev_copy(tmp_path)  # polling off: only the signal can bring the change in
    port = free_port()
    server = _serve("--config", str(setup / "pdp.toml"), port=port)
    url = f"http://127.0.0.1:{port}/v1/check"
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz")
        assert httpx.post(url, json={"method": "GET", "path": "/orders"}).json()["reason"] == "cert_required"
        data_file = setup / "policy" / "data.json"
        data = json.loads(data_file.read_text())
        data["pdp"]["config"]["public_paths"].append("/orders")
        data_file.write_text(json.dumps(data))
        os.kill(server.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while httpx.post(url, json={"method": "GET", "path": "/orders"}).json()["reason"] != "public_path":
            assert server.poll() is None, "SIGHUP ended the server"
            assert time.monotonic() < deadline, "SIGHUP did not reload the policy"
            time.sleep(0.1)
    finally:
        _stop(server)


def test_sigterm_answers_the_request_in_flight_then_exits(dev):
    import socket

    port = free_port()
    server = _serve("--config", str(dev / "pdp.toml"), port=port)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz")
        body = json.dumps({"method": "GET", "path": "/healthz"}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
            conn.sendall(b"POST /v1/check HTTP/1.1\r\nhost: pdp\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n" % len(body) + body[:10])
            # The request is in flight once the server has read its head: a request sent after it on
            # another connection and answered shows the event loop has been past it (a connection whose
            # head is still unread when SIGTERM comes is idle, and uvicorn rightly closes it).
            for _ in range(3):
                wait_for(f"http://127.0.0.1:{port}/healthz")
            os.killpg(server.pid, signal.SIGTERM)
            wait_for_listener_closed(port)
            conn.sendall(body[10:])
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        _, err = server.communicate(timeout=20)
    finally:
        if server.poll() is None:
            _stop(server)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["allowed"] is True
    assert server.returncode in (0, -signal.SIGTERM)  # uvicorn ends by the signal once it has drained
    assert b"Traceback" not in err


def wait_for_listener_closed(port: int, timeout: float = 20.0) -> None:
    """Until a new connection to ``port`` is refused: the server has begun to stop."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return
        time.sleep(0.05)
    raise AssertionError(f"127.0.0.1:{port} still accepts connections")


# -- output to a reader that stops reading


def _to_a_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Run pdp with standard output a pipe nobody reads any more (``pdp check … | head -1`` once head is done)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([PDP, *args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                              check=False)
    finally:
        os.close(write)


def test_a_broken_pipe_keeps_the_exit_status_and_says_nothing(dev):
    deny = _to_a_closed_pipe("check", "--config", str(dev / "pdp.toml"), "--cert", str(dev / "other.pem"),
                             "--token", str(dev / "token.jwt"), "--path", "/orders")
    assert (deny.returncode, deny.stderr) == (1, "")
    allow = _to_a_closed_pipe("check", "--config", str(dev / "pdp.toml"), "--cert", str(dev / "client.pem"),
                              "--token", str(dev / "token.jwt"), "--path", "/orders", "--json")
    assert (allow.returncode, allow.stderr) == (0, "")
    tests = _to_a_closed_pipe("policy", "test", "-v")
    assert (tests.returncode, tests.stderr) == (0, "")
    inspect = _to_a_closed_pipe("cert", "inspect", str(dev / "client.pem"))
    assert (inspect.returncode, inspect.stderr) == (0, "")


# -- finding one's way


def test_bare_pdp_prints_the_help_with_every_command():
    result = pdp()
    assert result.returncode == 2
    for command in ("serve", "check", "cert", "token", "dev", "policy"):
        assert command in result.stdout
    assert "error" not in result.stderr


def test_pdp_version_prints_the_package_version():
    import pdp as package

    assert pdp("--version").stdout.strip() == f"pdp {package.__version__}"
    module = subprocess.run([sys.executable, "-m", "pdp", "--version"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert (module.returncode, module.stdout.strip()) == (0, f"pdp {package.__version__}")


def test_an_unknown_option_shows_the_usage_of_its_command():
    result = pdp("serve", "--bogus")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: pdp serve ") and "--workers" in result.stderr
    assert "pdp serve: error: unrecognized arguments: --bogus" in result.stderr


def test_token_inspect_on_a_terminal_says_it_reads_standard_input(dev):
    import pty

    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([PDP, "token", "inspect"], stdin=terminal, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        os.write(controller, (dev / "token.jwt").read_bytes().strip() + b"\n\x04")
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    assert "reading a token from standard input" in err and "Ctrl-D" in err
    assert json.loads(out)["claims"]["sub"] == "demo-user"


def test_the_commands_dev_init_prints_work_when_pasted(tmp_path):
    """Pasted at once, `pdp serve … &` and the curl calls right after it: the calls wait for the server, and
    `pdp` is the one that printed them, not whatever PATH holds."""
    env = dict(os.environ, PATH="/usr/bin:/bin")
    printed = subprocess.run([PDP, "dev", "init", "dev"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=60, check=True).stdout
    serve = next(line.strip() for line in printed.splitlines() if " serve " in line)
    assert serve == f"{PDP} serve --config dev/pdp.toml &"
    port = free_port()
    config = tmp_path / "dev" / "pdp.toml"  # a free port: other tests share this machine
    config.write_text(config.read_text().replace("127.0.0.1:8181", f"127.0.0.1:{port}")
                      .replace('grpc = "127.0.0.1:9191"', 'grpc = ""'))
    block = printed.replace("127.0.0.1:8181", f"127.0.0.1:{port}").splitlines()
    curls = [line for line in block if line.startswith("curl ")]
    assert len(curls) == 2
    script = "\n".join([serve, f"{curls[0]} > allowed.json", f"{curls[1]} > denied.json", "kill $!", "wait"])
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120, check=False, start_new_session=True)
    assert "Traceback" not in result.stderr
    allowed, denied = (json.loads((tmp_path / name).read_text()) for name in ("allowed.json", "denied.json"))
    assert (allowed["allowed"], allowed["reason"]) == (True, "allowed")
    assert (denied["allowed"], denied["reason"]) == (False, "binding_mismatch")


def test_policy_test_on_regopy_says_it_cannot_run_with_expressions():
    result = pdp("policy", "test", "--engine", "regopy")
    assert result.returncode == 2
    assert "regopy" in result.stderr and "`with`" in result.stderr
    assert "configuration error" not in result.stderr and "terminate called" not in result.stderr


def test_check_path_without_a_leading_slash_says_so():
    result = pdp("check", "--path", "orders")
    assert result.returncode == 2
    assert "argument --path: 'orders' does not start with '/' (a path such as /orders)" in result.stderr


def test_token_inspect_tells_a_good_signature_from_an_expired_token(dev, tmp_path):
    import time

    from cryptography.hazmat.primitives import serialization

    from pdp.devinit import AUDIENCE, ISSUER
    from pdp.devpki import TokenIssuer

    key = serialization.load_pem_private_key((dev / "issuer.key").read_bytes(), None)
    expired = tmp_path / "expired.jwt"
    expired.write_text(TokenIssuer(ISSUER, key, "dev-1").mint(audience=AUDIENCE, lifetime=-7500, now=time.time()))
    result = pdp("token", "inspect", str(expired), "--config", str(dev / "pdp.toml"))
    assert result.returncode == 1  # invalid, whatever the signature
    out = json.loads(result.stdout)
    assert out["signature"] == f"good (key 'dev-1' of {ISSUER})"
    assert out["verdict"].startswith("INVALID token_expired: expired at 20")
    assert out["verdict"].endswith("Z, 2 h 5 min ago")


def _dev_config(dev: Path, name: str, extra: str = "", **replace: str) -> Path:
    """A copy of the dev config next to its files (relative paths stay good), edited."""
    text = (dev / "pdp.toml").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = dev / name
    path.write_text(text + extra)
    return path


def test_config_check_loads_everything_but_listens_on_nothing(dev):
    import socket

    from pdp.assemble import load_policy
    from pdp.config import load_config

    with socket.socket() as taken, socket.socket() as grpc_taken:  # held: `pdp serve` could not start
        for s in (taken, grpc_taken):
            s.bind(("127.0.0.1", 0))
            s.listen()
        http, grpc = (f"127.0.0.1:{s.getsockname()[1]}" for s in (taken, grpc_taken))
        config = _dev_config(dev, "check-ok.toml", '\n[server.tls]\ncert = "pdp-server.pem"\n'
                             'key = "pdp-server.key"\nclient_ca = "ca.pem"\n',
                             **{'http = "127.0.0.1:8181"': f'http = "{http}"',
                                'grpc = "127.0.0.1:9191"': f'grpc = "{grpc}"'})
        result = pdp("config", "check", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {config}: policy ")
    assert "(engine regorus), 1 trust bundle(s) (example.org), 1 issuer(s) (https://issuer.example.org)" \
        in result.stdout
    assert f"policy {load_policy(load_config(config)).version} " in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(("case", "expected", "detail"), [
    ("unknown key", "tokens.leway: unknown key (did you mean 'leeway'?)", ""),
    ("missing trust bundle", "certificates.trust_bundles[0].file: cannot read ", "no-such-ca.pem"),
    ("not a JWKS", "tokens.issuers[0].jwks_file: JWKS ", "not a JWKS document"),
    ("policy that does not compile", "policy.paths: policy does not compile", "broken.rego"),
    ("listener key of another certificate", "server.tls.key: ", "client.key' is not the key of"),
    ("encrypted listener key", "server.tls.key: ", "encrypted"),
])
def test_config_check_names_the_file_and_the_key_at_fault(dev, tmp_path, case, expected, detail):
    from cryptography.hazmat.primitives import serialization

    name = f"check-{case.replace(' ', '-')}.toml"
    tls = '\n[server.tls]\ncert = "pdp-server.pem"\nkey = "{}"\n'
    if case == "unknown key":
        config = _dev_config(dev, name, **{"leeway = 30": "leway = 30"})
    elif case == "missing trust bundle":
        config = _dev_config(dev, name, **{'file = "ca.pem"': 'file = "no-such-ca.pem"'})
    elif case == "not a JWKS":
        config = _dev_config(dev, name, **{'jwks_file = "jwks.json"': 'jwks_file = "ca.pem"'})
    elif case == "policy that does not compile":
        broken = tmp_path / "policy"
        broken.mkdir()
        (broken / "broken.rego").write_text('package pdp.authz\n\nresult := {"allowed": true\n')
        config = _dev_config(dev, name, **{'paths = ["policy"]': f'paths = ["{broken}"]'})
    elif case == "listener key of another certificate":
        config = _dev_config(dev, name, tls.format("client.key"))
    else:
        key = serialization.load_pem_private_key((dev / "pdp-server.key").read_bytes(), None)
        (tmp_path / "encrypted.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass phrase")))
        config = _dev_config(dev, name, tls.format(tmp_path / "encrypted.key"))
    result = pdp("config", "check", str(config))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"pdp config check: {config}: {expected}"), result.stderr
    assert detail in result.stderr
    assert "Traceback" not in result.stderr
