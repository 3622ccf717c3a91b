"""pdp.policy.shadow: a shadow policy beside the enforced one, on live decisions with real credentials.

The shadow answers in a process of its own (``pdp.policy.shadow_process``), after the decision: a test
waits for its answers with ``Trial.drain`` before it reads what was logged and counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import bound_token, check_request
from policy_trials import CONFLICTING, ENFORCED, NEXT, SLOW, alive, lines_of, shadow_processes, write_policy
from servers import free_port, serve_pdp, wait_for

from pdp.assemble import build_pdp, load_shadow_policy
from pdp.config import load_config
from pdp.errors import ConfigError
from pdp.policy.result import PolicyOutcome
from pdp.policy.shadow import Trial, differences
from pdp.service.metrics import Metrics
from pdp.service.server import Service

PDP = str(Path(sys.executable).parent / "pdp")


def _config(write_setup: Any, tmp_path: Path, shadow: str = NEXT, extra: str = "") -> Path:
    enforced = write_policy(tmp_path / "enforced", ENFORCED)
    write_policy(tmp_path / "next", shadow)
    return write_setup(engine="regorus", policy_paths=[str(enforced)],
                       extra=f'[policy.shadow]\npaths = ["next"]\n{extra}')


def _count(service: Service | Metrics, result: str) -> float:
    metrics = service.metrics if isinstance(service, Service) else service
    for line in metrics.render().decode().splitlines():
        if line.startswith(f'pdp_shadow_decisions_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_different_shadow_answer_is_logged_and_counted_and_never_changes_the_decision(
        write_setup: Any, tmp_path: Path, pki: Any, issuer: Any) -> None:
    service = Service(load_config(_config(write_setup, tmp_path)))
    try:
        read_only = bound_token(issuer, pki.client, scope="read")
        with lines_of("pdp.decisions.shadow") as lines:
            first = service.pdp.decide(check_request(chain=pki.chain(), token=read_only))
            again = service.pdp.decide(check_request(chain=pki.chain(), token=read_only))
            assert service.pdp.trial is not None and service.pdp.trial.drain()
        assert first.allowed and again.allowed and first.headers["x-tier"] == "gold"
        assert "the same facts as a decision before" in again.steps[-2].detail  # the enforced cache answered
        assert _count(service, "different") == 2  # ... and the shadow was still asked
        assert len(lines) == 2
        line = json.loads(lines[0])
        assert line["decision_id"] == first.decision_id and line["shadow"] == "different"
        assert line["differs"] == ["allowed"]
        assert line["request"] == {"method": "GET", "host": "api.test", "path": "/orders"}
        assert line["enforced"]["allowed"] is True and line["enforced"]["policy_version"] == service.pdp.policy.version
        assert line["shadow_policy"] == {**line["shadow_policy"], "allowed": False, "reason": "not_yet",
                                         "status": 403}
        assert line["shadow_policy"]["policy_version"] == service.pdp.trial.shadow.version  # type: ignore[union-attr]
        assert read_only not in lines[0]

        with lines_of("pdp.decisions.shadow") as lines:
            same = service.pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
            assert service.pdp.trial.drain()
        assert same.allowed and lines == [] and _count(service, "same") == 1
    finally:
        service.stop()


def test_a_shadow_that_fails_never_denies_and_is_counted_as_an_error(
        write_setup: Any, tmp_path: Path, pki: Any, issuer: Any) -> None:
    service = Service(load_config(_config(write_setup, tmp_path, shadow=CONFLICTING)))
    try:
        with lines_of("pdp.decisions.shadow") as lines:
            decision = service.pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
            assert service.pdp.trial is not None and service.pdp.trial.drain()
        assert decision.allowed and decision.reason == "allowed"
        assert _count(service, "error") == 1 and _count(service, "different") == 0
        line = json.loads(lines[0])
        assert line["shadow"] == "error" and "conflict" in line["shadow_policy"]["error"]
    finally:
        service.stop()


def test_an_invalid_credential_never_reaches_either_policy(write_setup: Any, tmp_path: Path, pki: Any,
                                                           issuer: Any) -> None:
    pdp = build_pdp(load_config(_config(write_setup, tmp_path)), probe=False)
    try:
        with lines_of("pdp.decisions.shadow") as lines:
            decision = pdp.decide(check_request(chain=pki.chain(pki.other), token=bound_token(issuer, pki.client)))
            assert pdp.trial is not None and pdp.trial.drain()
        assert not decision.allowed and decision.reason == "binding_mismatch" and lines == []
        assert pdp.trial.shadow_process is not None and pdp.trial.shadow_process.pid is None  # never started
    finally:
        pdp.close()


def test_a_shadow_that_does_not_load_at_start_is_an_error_naming_its_key(write_setup: Any, tmp_path: Path) -> None:
    config = load_config(_config(write_setup, tmp_path, extra='data = ["missing.json"]\n'))
    with pytest.raises(ConfigError) as caught:
        build_pdp(config, probe=False)
    assert caught.value.key == "policy.shadow.data"
    (tmp_path / "next" / "authz.rego").unlink()
    with pytest.raises(ConfigError) as caught:
        build_pdp(load_config(_config(write_setup, tmp_path, shadow="package pdp.authz\nresult := input.x[")),
                  probe=False)
    assert caught.value.key == "policy.shadow.paths"


def test_the_shadow_goes_through_the_divergence_checks(write_setup: Any, tmp_path: Path) -> None:
    """`not f(x)` with x undefined is true on regorus and undefined on OPA: refused for the shadow too."""
    divergent = NEXT + '\nrisky if not startswith(input.attributes.request.http.headers["x-f"], "203.0.113.")\n'
    with pytest.raises(ConfigError) as caught:
        build_pdp(load_config(_config(write_setup, tmp_path, shadow=divergent)), probe=False)
    assert caught.value.key == "policy.shadow.paths" and "divergence" in str(caught.value)


def test_a_reload_replaces_the_shadow_and_keeps_the_last_good_one(write_setup: Any, tmp_path: Path, pki: Any,
                                                                  issuer: Any) -> None:
    service = Service(load_config(_config(write_setup, tmp_path)))
    try:
        trial = service.pdp.trial
        assert trial is not None and trial.shadow is not None and trial.shadow_process is not None
        token = bound_token(issuer, pki.client, scope="read")
        service.pdp.decide(check_request(chain=pki.chain(), token=token))
        assert trial.drain() and _count(service, "different") == 1
        good, first_process = trial.shadow.version, trial.shadow_process.pid
        (tmp_path / "next" / "authz.rego").write_text("package pdp.authz\nresult := {")
        service.reloader.check(force=True)
        assert trial.shadow.version == good
        write_policy(tmp_path / "next", ENFORCED)
        service.reloader.check(force=True)
        assert trial.shadow.version != good  # the enforced policy's text now
        decision = service.pdp.decide(check_request(chain=pki.chain(), token=token))
        assert trial.drain()
        assert decision.allowed and _count(service, "same") == 1
        assert first_process is not None and trial.shadow_process.pid not in (None, first_process)
        assert not alive(first_process)  # the old version's process is gone
        metrics = service.metrics.render().decode()
        assert 'pdp_reloads_total{part="policy.shadow",result="failed"} 1.0' in metrics
    finally:
        service.stop()


def test_readyz_names_the_shadow_version(write_setup: Any, tmp_path: Path) -> None:
    with serve_pdp(load_config(_config(write_setup, tmp_path))) as (url, service):
        ready = httpx.get(f"{url}/readyz").json()
    assert ready["shadow_policy_version"] == service.pdp.trial.shadow.version  # type: ignore[union-attr]
    assert ready["dry_run"] is False


def test_what_differs_is_what_a_caller_or_an_upstream_gets() -> None:
    allow = PolicyOutcome(allowed=True, headers={"x-a": "1"})
    assert differences(allow, PolicyOutcome(allowed=True, headers={"x-a": "1"}, dynamic_metadata={"m": 1})) == []
    assert differences(allow, PolicyOutcome(allowed=True, headers={"x-a": "2"})) == ["headers"]
    assert differences(allow, PolicyOutcome(allowed=False)) == ["allowed"]
    deny = PolicyOutcome(allowed=False)
    assert differences(deny, PolicyOutcome(allowed=False, reason="policy_denied")) == []
    assert differences(deny, PolicyOutcome(allowed=False, http_status=404)) == ["status"]
    assert differences(deny, PolicyOutcome(allowed=False, reason="closed")) == ["reason"]


# -- the shadow never on a decision's path


def _slow_request(pki: Any, issuer: Any, n: int) -> Any:
    return check_request(chain=pki.chain(), token=bound_token(issuer, pki.client), headers={"x-n": str(n)})


def test_a_slow_shadow_never_slows_a_decision(write_setup: Any, tmp_path: Path, pki: Any, issuer: Any) -> None:
    """regorus holds the GIL for a whole evaluation: a shadow evaluated in the served process (in any
    thread) would stall every decision for as long as it takes."""
    service = Service(load_config(_config(write_setup, tmp_path, shadow=SLOW, extra="timeout = 30\n")))
    try:
        trial = service.pdp.trial
        assert trial is not None and trial.shadow_process is not None
        service.pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
        assert trial.drain()  # the shadow's process is up
        started = time.monotonic()
        t = time.perf_counter()
        slow = service.pdp.decide(_slow_request(pki, issuer, 2_000_000))  # a couple of seconds of shadow
        slow_took = time.perf_counter() - t
        took = []
        while trial.shadow_process.drain(0.0) is False and time.monotonic() - started < 30:
            t = time.perf_counter()
            decision = service.pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
            took.append(time.perf_counter() - t)
            assert decision.allowed
            time.sleep(0.05)
        assert slow.allowed and slow.headers["x-tier"] == "gold"  # the enforced policy's answer, at once
        assert len(took) >= 10, "the shadow answered too soon: the test proves nothing"
        # Every decision takes its usual millisecond or two; on a busy machine one may be descheduled.
        assert slow_took < 0.25, slow_took  # the shadow's couple of seconds are not in it
        assert sum(t < 0.05 for t in took) >= 0.9 * len(took), took
        with lines_of("pdp.decisions.shadow") as lines:
            assert trial.drain()
        assert _count(service, "different") == 1 and _count(service, "same") == 1 + len(took)
        assert [json.loads(line)["shadow_policy"]["reason"] for line in lines] in ([], ["slow"])
    finally:
        service.stop()


def test_a_shadow_slower_than_its_timeout_is_an_error_and_its_process_replaced(
        write_setup: Any, tmp_path: Path, pki: Any, issuer: Any) -> None:
    service = Service(load_config(_config(write_setup, tmp_path, shadow=SLOW, extra="timeout = 0.3\n")))
    try:
        trial = service.pdp.trial
        assert trial is not None and trial.shadow_process is not None
        service.pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
        assert trial.drain()
        first = trial.shadow_process.pid
        with lines_of("pdp.decisions.shadow") as lines:
            decision = service.pdp.decide(_slow_request(pki, issuer, 20_000_000))
            assert trial.drain()
        assert decision.allowed and _count(service, "error") == 1
        [line] = [json.loads(text) for text in lines]
        assert line["decision_id"] == decision.decision_id and line["shadow"] == "error"
        assert "timed out after 0.3 s" in line["shadow_policy"]["error"]
        assert first is not None and not alive(first)
        service.pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
        assert trial.drain() and _count(service, "same") == 2  # a new process answers
        assert trial.shadow_process.pid not in (None, first)
    finally:
        service.stop()


def test_a_shadow_process_that_dies_is_replaced(write_setup: Any, tmp_path: Path, pki: Any, issuer: Any) -> None:
    service = Service(load_config(_config(write_setup, tmp_path, shadow=SLOW)))
    try:
        trial = service.pdp.trial
        assert trial is not None and trial.shadow_process is not None
        service.pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
        assert trial.drain()
        first = trial.shadow_process.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive(first) and time.monotonic() < deadline:
            time.sleep(0.02)
        service.pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
        assert trial.drain() and _count(service, "same") == 2 and _count(service, "error") == 0
        assert trial.shadow_process.pid not in (None, first)
    finally:
        service.stop()


def test_a_full_queue_skips_the_comparison_and_counts_it(write_setup: Any, tmp_path: Path, pki: Any,
                                                         issuer: Any) -> None:
    config = load_config(_config(write_setup, tmp_path, shadow=SLOW))
    pdp = build_pdp(config, probe=False)
    metrics = Metrics()
    pdp.trial = Trial(shadow=load_shadow_policy(config, probe=False), shadow_queue=2, shadow_timeout=30,
                      observer=metrics)
    try:
        decisions = [pdp.decide(_slow_request(pki, issuer, 1_000_000))]  # keeps the shadow busy
        decisions += [pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
                      for _ in range(6)]
        assert all(d.allowed for d in decisions)
        assert pdp.trial.drain()
        counts = {r: _count(metrics, r) for r in ("same", "different", "error", "skipped")}
        assert counts["skipped"] >= 4 and counts["error"] == 0 and sum(counts.values()) == 7, counts
    finally:
        pdp.trial.close()
        pdp.close()


def test_closing_the_decision_point_stops_the_shadow_process(write_setup: Any, tmp_path: Path, pki: Any,
                                                             issuer: Any) -> None:
    service = Service(load_config(_config(write_setup, tmp_path, shadow=SLOW, extra="timeout = 30\n")))
    trial = service.pdp.trial
    assert trial is not None and trial.shadow_process is not None
    service.pdp.decide(_slow_request(pki, issuer, 20_000_000))  # still evaluating when the service stops
    deadline = time.monotonic() + 20
    while trial.shadow_process.pid is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child = trial.shadow_process.pid
    assert child is not None
    started = time.monotonic()
    service.stop()
    assert time.monotonic() - started < 5 and not alive(child) and shadow_processes(os.getpid()) == []
    service.pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))  # after close
    assert trial.shadow_process.pid is None


# -- the shadow's line


def test_the_shadow_is_compared_with_the_decision_actually_made(write_setup: Any, tmp_path: Path, pki: Any,
                                                                issuer: Any) -> None:
    """A policy allow that pdp turns into a deny (a query change this entry point cannot make) is
    compared as the deny it became, not as the allow the policy gave."""
    changes_query = 'package pdp.authz\nresult := {"allowed": true, "query_parameters_to_remove": ["debug"]}\n'
    enforced = write_policy(tmp_path / "enforced", changes_query)
    write_policy(tmp_path / "next", changes_query)
    config = write_setup(engine="regorus", policy_paths=[str(enforced)], extra='[policy.shadow]\npaths = ["next"]\n')
    service = Service(load_config(config))
    try:
        request = dataclasses.replace(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)),
                                      query_rewritable=False)
        with lines_of("pdp.decisions.shadow") as lines:
            decision = service.pdp.decide(request)
            assert service.pdp.trial is not None and service.pdp.trial.drain()
        assert not decision.allowed and decision.reason == "policy_error"
        [line] = [json.loads(text) for text in lines]
        assert line["differs"] == ["allowed"]
        assert line["enforced"] == {**line["enforced"], "allowed": False, "reason": "policy_error",
                                    "status": decision.status}
    finally:
        service.stop()


def test_a_huge_shadow_answer_is_logged_cut_to_size(write_setup: Any, tmp_path: Path, pki: Any,
                                                    issuer: Any) -> None:
    huge = ('package pdp.authz\n'
            'long := concat("", ["v" | some _ in numbers.range(1, 400)])\n'
            'result := {"allowed": true, "headers": {sprintf("h%d", [i]): long | some i in numbers.range(1, 500)}, '
            '"body": concat("", [long | some _ in numbers.range(1, 100)])}\n')
    service = Service(load_config(_config(write_setup, tmp_path, shadow=huge)))
    try:
        with lines_of("pdp.decisions.shadow") as lines:
            service.pdp.decide(check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
            assert service.pdp.trial is not None and service.pdp.trial.drain()
        [text] = lines
        shadow = json.loads(text)["shadow_policy"]
        assert len(text) < 64 * 1024 and shadow["truncated"] is True
        assert len(shadow["headers"]) == 50 and all(len(v) == 256 for _, v in shadow["headers"])
        assert "truncated" not in json.loads(text)["enforced"]
    finally:
        service.stop()


# -- pdp serve


def _serve(config: Path, *more: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    server = subprocess.Popen([PDP, "serve", "--config", str(config), "--http", f"127.0.0.1:{port}", "--grpc", "",
                               *more], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_for(f"{base}/healthz", timeout=60)
    return server, base


def _check(base: str, pki: Any, issuer: Any, **headers: str) -> Any:
    return httpx.post(f"{base}/v1/check", timeout=30, json={
        "method": "GET", "path": "/orders", "host": "api.test", "client_cert": pki.chain_pem(),
        "headers": {"authorization": f"Bearer {bound_token(issuer, pki.client)}", **headers}}).json()


def test_healthz_stays_fast_while_a_served_shadow_is_slow(write_setup: Any, tmp_path: Path, pki: Any,
                                                          issuer: Any) -> None:
    server, base = _serve(_config(write_setup, tmp_path, shadow=SLOW, extra="timeout = 30\n"))
    try:
        assert _check(base, pki, issuer)["allowed"] is True
        started = time.perf_counter()
        assert _check(base, pki, issuer, **{"x-n": "3000000"})["allowed"] is True  # seconds of shadow
        assert time.perf_counter() - started < 0.5
        checks = threading.Thread(target=lambda: [_check(base, pki, issuer, **{"x-n": "3000001"})])
        checks.start()
        time.sleep(0.2)
        took = []
        for _ in range(5):
            t = time.perf_counter()
            assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
            took.append(time.perf_counter() - t)
        checks.join()
        assert max(took) < 0.25, took
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.communicate(timeout=30)


def test_a_shadow_process_never_outlives_its_server(write_setup: Any, tmp_path: Path, pki: Any,
                                                    issuer: Any) -> None:
    """Killed without a chance to stop it (SIGKILL), the server's shadow process goes too."""
    server, base = _serve(_config(write_setup, tmp_path, shadow=SLOW, extra="timeout = 30\n"))
    try:
        _check(base, pki, issuer, **{"x-n": "20000000"})  # the shadow is busy when its server dies
        deadline = time.monotonic() + 20
        while not (children := shadow_processes(server.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(children) == 1
        os.kill(server.pid, signal.SIGKILL)
        server.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while alive(children[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(children[0])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)


def test_every_worker_compares_in_a_shadow_process_of_its_own(write_setup: Any, tmp_path: Path, pki: Any,
                                                              issuer: Any) -> None:
    env_tmp = tmp_path / "tmp"
    env_tmp.mkdir()
    port = free_port()
    server = subprocess.Popen([PDP, "serve", "--config", str(_config(write_setup, tmp_path, shadow=NEXT)),
                               "--workers", "2", "--http", f"127.0.0.1:{port}", "--grpc", ""],
                              env=dict(os.environ, TMPDIR=str(env_tmp)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/healthz", timeout=60)
        sent = 0
        deadline = time.monotonic() + 60
        while len(shadow_processes(server.pid)) < 2 and time.monotonic() < deadline:
            for _ in range(5):  # a new connection each: the kernel spreads them over both workers
                assert _check(base, pki, issuer)["allowed"] is True
                sent += 1
            time.sleep(0.2)
        children = shadow_processes(server.pid)
        assert len(children) == 2, "one worker answered every request, or a worker has no shadow process"
        while time.monotonic() < deadline:
            text = httpx.get(f"{base}/metrics").text
            compared = sum(float(line.split()[-1]) for line in text.splitlines()
                           if line.startswith("pdp_shadow_decisions_total{"))
            if compared == sent:
                break
            time.sleep(0.2)
        assert compared == sent
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err.decode()
    assert not any(alive(child) for child in children)


def test_the_enforced_policy_as_its_own_shadow_never_differs(write_setup: Any, tmp_path: Path, pki: Any,
                                                             issuer: Any) -> None:
    """An outcome goes to the shadow's process and back as JSON: nothing a comparison reads may change."""
    rich = ENFORCED + ('\nresult := {"allowed": true, "headers": {"set-cookie": ["a=1", "b=2"], "x-a": "1"}, '
                       '"response_headers_to_add": {"x-r": "2"}, "request_headers_to_remove": ["x-old"], '
                       '"query_parameters_to_set": {"p": ["1", "2"]}, "query_parameters_to_remove": ["q"], '
                       '"dynamic_metadata": {"m": [1]}} if input.path == "/rich"\n'
                       'result := {"allowed": false, "http_status": 418, "body": "no\\u00e9", "scope": "write"} '
                       'if input.path == "/teapot"\n')
    service = Service(load_config(_config(write_setup, tmp_path, shadow=rich, extra="")))
    write_policy(tmp_path / "enforced", rich)
    service.reloader.check(force=True)
    try:
        sent = 0
        for path in ("/orders", "/closed", "/revoked-by-policy", "/x", "/rich", "/teapot"):
            for token in (bound_token(issuer, pki.client), None):
                service.pdp.decide(check_request(chain=pki.chain(), token=token, path=path))
                sent += 1
        assert service.pdp.trial is not None and service.pdp.trial.drain()
        assert _count(service, "same") == sent and _count(service, "different") == 0
    finally:
        service.stop()
