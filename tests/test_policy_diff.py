"""``pdp policy diff`` on inputs recorded by a real pdp (``log.include_input``), and their redaction."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from conftest import bound_token, check_request
from policy_trials import ENFORCED, NEXT, lines_of, with_policy_keys, write_policy

from pdp.assemble import build_pdp
from pdp.cli import main
from pdp.config import load_config
from pdp.devpki import DpopKey
from pdp.errors import ConfigError
from pdp.policy.shadow import REDACTED
from pdp.request import CheckRequest

PDP = str(Path(sys.executable).parent / "pdp")


def _recording_pdp(write_setup: Any, tmp_path: Path, include_input: bool = True) -> Any:
    folder = write_policy(tmp_path / "old", ENFORCED)
    config = write_setup(engine="regorus", policy_paths=[str(folder)],
                         extra=f"[log]\ninclude_input = {'true' if include_input else 'false'}\n")
    return build_pdp(load_config(config), probe=False)


def _decision_lines(pdp: Any, *requests: Any) -> list[str]:
    with lines_of("pdp.decisions") as lines:
        for request in requests:
            pdp.decide(request)
    return lines


def test_a_recorded_input_has_its_credentials_redacted(write_setup: Any, tmp_path: Path, pki: Any,
                                                       issuer: Any) -> None:
    pdp = _recording_pdp(write_setup, tmp_path)
    token = bound_token(issuer, pki.client)
    proof = DpopKey.generate().proof("GET", "https://api.test/orders")
    [line] = _decision_lines(pdp, check_request(
        chain=pki.chain(), token=token, path=f"/orders?access_token={token}&page=2",
        headers={"dpop": proof, "cookie": "session=s3cret", "proxy-authorization": "Basic cGRwOnMzY3JldA==",
                 "x-trace": "kept"}))
    for secret in (token, proof, "s3cret", "cGRwOnMzY3JldA==", token.split(".")[2]):
        assert secret not in line
    recorded = json.loads(line)["input"]
    headers = recorded["attributes"]["request"]["http"]["headers"]
    assert headers == {**headers, "authorization": REDACTED, "dpop": REDACTED, "cookie": REDACTED,
                       "proxy-authorization": REDACTED, "x-trace": "kept"}
    assert recorded["parsed_query"] == {"access_token": [REDACTED], "page": ["2"]}
    assert recorded["attributes"]["request"]["http"]["path"] == "/orders?access_token=[REDACTED]&page=2"
    assert recorded["token"]["present"] is True and recorded["token"]["sub"] == "demo-user"  # what policies read


def test_without_include_input_a_line_holds_no_input(write_setup: Any, tmp_path: Path, pki: Any,
                                                     issuer: Any) -> None:
    pdp = _recording_pdp(write_setup, tmp_path, include_input=False)
    [line] = _decision_lines(pdp, check_request(chain=pki.chain(), token=bound_token(issuer, pki.client)))
    assert "input" not in json.loads(line)


@pytest.fixture
def recorded(write_setup: Any, tmp_path: Path, pki: Any, issuer: Any) -> Path:
    """Lines a real pdp logged, with a bare input and lines that are not inputs among them."""
    pdp = _recording_pdp(write_setup, tmp_path)
    both = check_request(chain=pki.chain(), token=bound_token(issuer, pki.client, scope="read write"))
    read_only = check_request(chain=pki.chain(), token=bound_token(issuer, pki.client, scope="read"))
    refused = check_request(chain=pki.chain(pki.other), token=bound_token(issuer, pki.client))  # before the policy
    first, second, before_policy = _decision_lines(pdp, both, read_only, refused)
    bare = json.dumps(json.loads(first)["input"])
    lines = [first, second, "{not json", bare, "[1, 2]", before_policy, "", '{"input": "text"}']
    path = tmp_path / "decisions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    write_policy(tmp_path / "new", NEXT)
    return path


def test_differences_are_listed_by_line_and_exit_1(recorded: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["policy", "diff", str(tmp_path / "old"), str(tmp_path / "new"), "--requests", str(recorded)])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[:5] == [
        "line 2: GET /orders: old allowed (allowed), new denied (not_yet, 403)",
        "line 3: skipped: not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
        "line 5: skipped: not a JSON object",
        "line 6: skipped: a decision line without an input (log.include_input was off, or pdp denied before "
        "the policy ran)",
        "line 8: skipped: its 'input' member is not an object",
    ]
    assert out[5].startswith("3 input(s) replayed: 1 differ, 2 the same; 4 line(s) skipped (not an input) (old ")


def test_the_same_policy_twice_differs_nowhere_and_exits_0(recorded: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    old = str(tmp_path / "old" / "authz.rego")
    assert main(["policy", "diff", old, old, "--requests", str(recorded)]) == 0
    assert "3 input(s) replayed: 0 differ, 3 the same" in capsys.readouterr().out


def test_a_reason_or_status_that_changes_is_a_difference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_policy(tmp_path / "a", 'package pdp.authz\nresult := {"allowed": false, "reason": "closed"}\n')
    new = write_policy(tmp_path / "b", 'package pdp.authz\nresult := {"allowed": false, "reason": "closed", '
                                       '"http_status": 404}\n')
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"attributes": {"request": {"http": {"method": "POST", "path": "/x?q=1"}}},
                                    "path": "/x"}) + "\n")
    assert main(["policy", "diff", str(old), str(new), "--requests", str(requests)]) == 1
    assert capsys.readouterr().out.startswith(
        "line 1: POST /x: old denied (closed, 403), new denied (closed, 404) (differs in status)")


def test_usage_and_load_errors_exit_2_naming_what_failed(recorded: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    assert main(["policy", "diff", str(tmp_path / "missing"), new, "--requests", str(recorded)]) == 2
    assert "pdp policy diff: OLD (" in capsys.readouterr().err
    broken = write_policy(tmp_path / "broken", "package pdp.authz\nresult := {")
    assert main(["policy", "diff", old, str(broken), "--requests", str(recorded)]) == 2
    err = capsys.readouterr().err
    assert "pdp policy diff: NEW (" in err and "does not compile" in err
    assert main(["policy", "diff", old, new, "--requests", str(tmp_path / "nothing.jsonl")]) == 2
    assert "--requests" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n[]\n")
    assert main(["policy", "diff", old, new, "--requests", str(empty)]) == 2
    assert "no recorded input" in capsys.readouterr().err


def test_the_command_as_run_reports_without_a_traceback(recorded: Path, tmp_path: Path) -> None:
    ran = subprocess.run([PDP, "policy", "diff", str(tmp_path / "old"), str(tmp_path / "new"), "--requests", "-"],
                         input=recorded.read_text(), capture_output=True, text=True, timeout=60, check=False)
    assert ran.returncode == 1 and "line 2: GET /orders" in ran.stdout and ran.stderr == ""
    ran = subprocess.run([PDP, "policy", "diff", str(tmp_path / "old"), str(tmp_path / "nowhere"), "--requests",
                          str(recorded)], capture_output=True, text=True, timeout=60, check=False)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr and "NEW" in ran.stderr


def _diff_rss(old: Path, new: Path, requests: Path, out: Path) -> tuple[int, int]:
    """Run ``pdp policy diff``: its exit status and its peak resident memory (KiB, this child's alone)."""
    with out.open("w") as stdout:
        child = subprocess.Popen([PDP, "policy", "diff", str(old), str(new), "--requests", str(requests)],
                                 stdout=stdout, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, usage.ru_maxrss


def test_a_hundred_thousand_lines_are_replayed_in_bounded_memory(tmp_path: Path) -> None:
    """The file is streamed: 100k lines (40 MB) take no more memory than 1k lines do."""
    old = write_policy(tmp_path / "old", 'package pdp.authz\nresult := {"allowed": input.path != "/admin"}\n')
    new = write_policy(tmp_path / "new", 'package pdp.authz\ndefault allowed := true\n'
                                         'allowed := false if startswith(input.path, "/ad")\n'
                                         'result := {"allowed": allowed}\n')
    paths, padding = ["/orders", "/admin", "/adverts", "/items"], "x" * 300
    few, many = tmp_path / "few.jsonl", tmp_path / "many.jsonl"
    with few.open("w") as a, many.open("w") as b:
        for i in range(100_000):
            line = json.dumps({"attributes": {"request": {"http": {"method": "GET"}}}, "path": paths[i % 4],
                               "n": i, "padding": padding}) + "\n"
            b.write(line)
            if i < 1000:
                a.write(line)
    code, small = _diff_rss(old, new, few, tmp_path / "few.out")
    assert code == 1
    code, large = _diff_rss(old, new, many, tmp_path / "many.out")
    shown = (tmp_path / "many.out").read_text().splitlines()
    assert code == 1 and len(shown) == 25_001 and shown[0] == "line 3: GET /adverts: old allowed (allowed), new " \
        "denied (policy_denied, 403)"
    assert shown[-1].startswith("100000 input(s) replayed: 25000 differ, 75000 the same")
    assert large - small < 16 * 1024, (small, large)


# -- what a recorded input never holds

SECRET = "s3cret-Value-0123456789"


def _recorded_input(write_setup: Any, tmp_path: Path, request: Any, extra: str = "") -> tuple[str, dict[str, Any]]:
    folder = write_policy(tmp_path / "old", 'package pdp.authz\nresult := {"allowed": true}\n')
    config = write_setup(engine="regorus", policy_paths=[str(folder)], extra=f"[log]\ninclude_input = true\n{extra}")
    [line] = _decision_lines(build_pdp(load_config(config), probe=False), request)
    return line, json.loads(line)["input"]


def _body_request(pki: Any, issuer: Any, body: str | bytes, content_type: str | None) -> CheckRequest:
    headers = {"authorization": f"Bearer {bound_token(issuer, pki.client)}"}
    if content_type:
        headers["content-type"] = content_type
    return CheckRequest(method="POST", path="/orders", host="api.test", time=time.time(),
                        headers=MappingProxyType(headers), client_cert_chain=pki.chain(), body=body)


@pytest.mark.parametrize("query", [
    f"access%5Ftoken={SECRET}", f"ACCESS_TOKEN={SECRET}", f"x=1;access_token={SECRET}", f"access_token+={SECRET}",
    f"refresh_token={SECRET}", f"code={SECRET}&state=kept", f"client_secret={SECRET}", f"x-api-key={SECRET}",
    f"next=%2Fcb%3Fid_token%3D{SECRET}"])
def test_a_credential_in_the_query_never_reaches_a_recorded_input(write_setup: Any, tmp_path: Path, pki: Any,
                                                                    issuer: Any, query: str) -> None:
    line, recorded = _recorded_input(write_setup, tmp_path, check_request(
        chain=pki.chain(), token=bound_token(issuer, pki.client), path=f"/orders?{query}",
        headers={":path": f"/orders?{query}", "referer": f"https://app.test/?{query}"}))
    assert SECRET not in line
    assert REDACTED in recorded["attributes"]["request"]["http"]["path"]
    assert "state=kept" in recorded["attributes"]["request"]["http"]["path"] or "state" not in query


@pytest.mark.parametrize("name", ["x-forwarded-access-token", "x-api-key", "x-apikey", "x-auth-request-token",
                                  "x-session-id", "x-amz-signature", "X-Client-Secret", "x-user-password",
                                  "x-tenant-pass"])
def test_a_credential_header_never_reaches_a_recorded_input(write_setup: Any, tmp_path: Path, pki: Any,
                                                            issuer: Any, name: str) -> None:
    """By name, by a part of its name, or named in ``log.redact_headers``."""
    line, recorded = _recorded_input(write_setup, tmp_path, check_request(
        chain=pki.chain(), token=bound_token(issuer, pki.client), headers={name.lower(): SECRET, "x-trace": "kept"}),
        extra='redact_headers = ["X-Tenant-Pass"]\n')
    headers = recorded["attributes"]["request"]["http"]["headers"]
    assert SECRET not in line and headers[name.lower()] == REDACTED and headers["x-trace"] == "kept"


@pytest.mark.parametrize(("body", "content_type"), [
    (json.dumps({"grant": {"access_token": SECRET}, "items": [{"refresh_token": SECRET}]}), "application/json"),
    (json.dumps({"Password": SECRET, "client_assertion": SECRET, "id_token": SECRET}), "application/json"),
    (json.dumps({"redirect": f"https://app.test/cb?code={SECRET}"}), "application/json"),
    (f"grant_type=authorization_code&code={SECRET}&code_verifier={SECRET}", "application/x-www-form-urlencoded"),
    (f"access_token={SECRET}", "text/plain"),
    (f"access_token={SECRET}".encode(), None),
])
def test_a_credential_in_the_body_never_reaches_a_recorded_input(write_setup: Any, tmp_path: Path, pki: Any,
                                                                 issuer: Any, body: str | bytes,
                                                                 content_type: str | None) -> None:
    line, recorded = _recorded_input(write_setup, tmp_path, _body_request(pki, issuer, body, content_type))
    http = recorded["attributes"]["request"]["http"]
    assert SECRET not in line and base64.b64encode(f"access_token={SECRET}".encode()).decode() not in line
    assert http.get("body", REDACTED) == REDACTED and http.get("rawBody", REDACTED) == REDACTED
    assert "body" in http or "rawBody" in http


def test_redaction_keeps_what_is_not_a_credential_as_it_was(write_setup: Any, tmp_path: Path, pki: Any,
                                                            issuer: Any) -> None:
    """A value that merely reads "access_token" is no credential; the rest of the query keeps every byte."""
    path = "/orders?q=access_token&x=a%2Fb&flag&y=1+2;z=%7E"
    _, recorded = _recorded_input(write_setup, tmp_path, check_request(
        chain=pki.chain(), token=bound_token(issuer, pki.client), path=path))
    assert recorded["attributes"]["request"]["http"]["path"] == path
    assert recorded["parsed_query"] == {"q": ["access_token"], "x": ["a/b"], "flag": [""], "y": ["1 2;z=~"]}
    body = json.dumps({"note": "send the access_token header", "access_token": SECRET, "n": [1, {"a": "b"}]})
    _, recorded = _recorded_input(write_setup, tmp_path / "b", _body_request(pki, issuer, body, "application/json"))
    assert recorded["parsed_body"] == {"note": "send the access_token header", "access_token": REDACTED,
                                       "n": [1, {"a": "b"}]}


def test_a_redacted_header_name_that_is_no_header_name_is_a_config_error(write_setup: Any, tmp_path: Path) -> None:
    config = write_setup(engine="regorus", extra='[log]\nredact_headers = ["x tenant"]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert caught.value.key == "log.redact_headers"


def test_recorded_inputs_are_never_kept_for_lines_that_are_not_written(write_setup: Any, tmp_path: Path, pki: Any,
                                                                       issuer: Any) -> None:
    """With decision lines off (a level above INFO), a decision's input is made into nothing and kept nowhere."""
    folder = write_policy(tmp_path / "old", ENFORCED)
    pdp = build_pdp(load_config(write_setup(engine="regorus", policy_paths=[str(folder)],
                                            extra="[log]\ninclude_input = true\n")), probe=False)
    token, big = bound_token(issuer, pki.client), "a" * 30_000
    decisions = logging.getLogger("pdp.decisions")
    level = decisions.level
    decisions.setLevel(logging.WARNING)
    try:
        pdp.decide(check_request(chain=pki.chain(), token=token, headers={"x-big": big}))
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            pdp.decide(check_request(chain=pki.chain(), token=token, path=f"/orders/{i}", headers={"x-big": big}))
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    finally:
        decisions.setLevel(level)
    assert grown < 1_000_000, grown  # 200 inputs of 30 KB each would be 6 MB
    [line] = _decision_lines(pdp, check_request(chain=pki.chain(), token=token, path="/orders/last"))
    assert json.loads(line)["input"]["path"] == "/orders/last"


def test_each_line_holds_its_own_decision_s_input_under_concurrency(write_setup: Any, tmp_path: Path, pki: Any,
                                                                     issuer: Any) -> None:
    policy = ('package pdp.authz\nresult := {"allowed": false, "reason": "nope"} if startswith(input.path, "/d")\n'
              'result := {"allowed": true} if startswith(input.path, "/a")\n')
    folder = write_policy(tmp_path / "old", policy)
    config = with_policy_keys(write_setup(engine="regorus", policy_paths=[str(folder)],
                                          extra="[log]\ninclude_input = true\n"), "dry_run = true")
    pdp = build_pdp(load_config(config), probe=False)
    token = bound_token(issuer, pki.client)
    paths: dict[str, str] = {}

    def work(n: int) -> None:
        for i in range(100):
            path = f"/{'d' if i % 2 else 'a'}/{n}/{i}"
            paths[pdp.decide(check_request(chain=pki.chain(), token=token, path=path)).decision_id] = path

    with lines_of("pdp.decisions") as lines:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(lines) == len(paths) == 600
    for line in map(json.loads, lines):
        path = paths[line["decision_id"]]
        assert line["input"]["path"] == path and ("dry_run" in line) == path.startswith("/d")


# -- pdp policy diff on hostile files


def test_a_lone_surrogate_or_bytes_that_are_not_utf8_never_crash_the_replay(tmp_path: Path) -> None:
    old = write_policy(tmp_path / "old", 'package pdp.authz\nresult := {"allowed": input.path == "/a\ufffdb"}\n')
    new = write_policy(tmp_path / "new", 'package pdp.authz\nresult := {"allowed": false}\n')
    lines = [b'{"attributes":{"request":{"http":{"method":"GET"}}},"path":"/a\\ud800b"}',
             b'{"attributes":{"request":{"http":{"method":"G\xffT"}}},"path":"/a\xc0b"}',
             b'{"attributes":{"request":{"http":{"method":"GET","x":"\\udc00\\ud800"}}},"path":"/c"}']
    requests = tmp_path / "r.jsonl"
    requests.write_bytes(b"\n".join(lines) + b"\n")
    for source, stdin in ((str(requests), None), ("-", requests.read_bytes())):
        ran = subprocess.run([PDP, "policy", "diff", str(old), str(new), "--requests", source], input=stdin,
                             capture_output=True, timeout=60, check=False)
        out = ran.stdout.decode()
        assert ran.returncode == 1 and ran.stderr == b"", (ran.returncode, ran.stderr)
        assert out.splitlines()[:2] == ["line 1: GET /a\ufffdb: old allowed (allowed), new denied (policy_denied, 403)",
                                        "line 2: G\ufffdT /a\ufffdb: old allowed (allowed), new denied (policy_denied, "
                                        "403)"]
        assert "3 input(s) replayed: 2 differ, 1 the same" in out


def test_a_crafted_path_cannot_forge_a_line_of_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write_policy(tmp_path / "old", 'package pdp.authz\nresult := {"allowed": false}\n')
    new = write_policy(tmp_path / "new", 'package pdp.authz\nresult := {"allowed": true}\n')
    forged = "/b\x1b[2J\nline 7: GET /x: old allowed (allowed), new denied (policy_denied, 403)\r"
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"attributes": {"request": {"http": {"method": "GET\u2028"}}}, "path": forged})
                        + "\n")
    assert main(["policy", "diff", str(old), str(new), "--requests", str(requests)]) == 1
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2 and "\x1b" not in out and "\r" not in out and "\u2028" not in out
    assert out.startswith('line 1: "GET\\u2028" "/b\\u001b[2J\\nline 7: GET /x')
