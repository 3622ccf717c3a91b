"""The README's promises and the examples, exercised as a user would run them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from servers import free_port, wait_for

from pdp.devinit import curl_command, dev_init

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PDP = str(Path(sys.executable).parent / "pdp")


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    section = README.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)\n```", section, re.DOTALL)
    assert commands == ["python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/pdp serve",
                        "./scripts/test"]
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_readme_curl_commands_are_the_ones_dev_init_prints():
    for cert in ("client.pem", "other.pem"):
        assert curl_command(Path("dev"), cert) in README


@pytest.fixture(scope="module")
def running_dev(tmp_path_factory: pytest.TempPathFactory):
    dev = tmp_path_factory.mktemp("ex") / "dev"
    dev_init(dev)
    port = free_port()
    proc = subprocess.Popen([PDP, "serve", "--config", str(dev / "pdp.toml"), "--http", f"127.0.0.1:{port}",
                             "--grpc", "127.0.0.1:0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz")
        yield dev, f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


@pytest.mark.parametrize(("spiffe_id", "scope", "method", "allowed"), [
    ("spiffe://example.org/demo/client", "read", "GET", True),
    ("spiffe://example.org/demo/client", "read", "POST", False),
    ("spiffe://example.org/demo/intruder", "read", "GET", False),
])
def test_bound_client_example(running_dev, spiffe_id, scope, method, allowed):
    dev, url = running_dev
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "bound_client.py"), "--dev", str(dev),
                             "--url", url, "--spiffe-id", spiffe_id, "--scope", scope, "--method", method],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == (0 if allowed else 1), result.stdout + result.stderr
    assert ('"allowed": true' in result.stdout) == allowed


def test_compose_runs_envoy_before_two_pdp_replicas_built_from_this_folder():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"setup", "pdp-1", "pdp-2", "envoy", "upstream", "redis"} <= set(services)
    assert "redis" in services["pdp-1"]["depends_on"]
    for name in ("pdp-1", "pdp-2"):
        assert services[name]["build"] == "." and (ROOT / "Dockerfile").is_file()
        assert services[name]["command"] == ["pdp", "serve", "--config", "/etc/pdp/pdp.toml"]
        assert "./examples/envoy/pdp.toml:/etc/pdp/pdp.toml:ro" in services[name]["volumes"]
    assert "./examples/envoy:/etc/envoy:ro" in services["envoy"]["volumes"]
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_every_toml_snippet_in_the_readme_is_a_valid_config(tmp_path):
    import tomllib

    from pdp.config import parse_config

    for name in ("pdp-server.pem", "pdp-server.key", "ca.pem"):
        (tmp_path / name).write_text("placeholder")
    blocks = re.findall(r"```toml\n(.*?)\n```", README, re.DOTALL)
    assert len(blocks) >= 6
    for block in blocks:
        text = block.replace('secret_sha256 = "…"', f'secret_sha256 = "{"ab" * 32}"')
        parse_config(tomllib.loads(text), tmp_path)  # raises ConfigError naming any key it does not know


def test_the_dockerfile_serves_http_and_grpc_on_every_interface_of_the_container():
    import json as _json

    from pdp.cli import build_parser

    lines = (ROOT / "Dockerfile").read_text().splitlines()
    (cmd,) = [_json.loads(line[len("CMD "):]) for line in lines if line.startswith("CMD ")]
    assert cmd[:2] == ["pdp", "serve"]
    args = build_parser().parse_args(cmd[1:])
    assert (args.http, args.grpc) == ("0.0.0.0:8181", "0.0.0.0:9191")
    (expose,) = [line.split()[1:] for line in lines if line.startswith("EXPOSE ")]
    assert set(expose) == {"8181", "9191"}


def test_the_readme_says_what_the_tests_need():
    section = README.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    for need in ("Python ≥ 3.11", "127.0.0.1:6379", "`../shared`"):
        assert need in section, need


def test_every_python_snippet_in_the_readme_imports_what_it_uses():
    import ast
    import builtins

    blocks = re.findall(r"```python\n(.*?)\n```", README, re.DOTALL)
    assert blocks
    for block in blocks:
        tree = ast.parse(block)
        known = set(dir(builtins))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                known |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                known.add(node.name)
                known |= {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)} \
                    if not isinstance(node, ast.ClassDef) else set()
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                known.add(node.id)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert used <= known, (used - known, block)
