"""``/metrics`` of a real ``pdp serve --workers 2``: every scrape, whichever worker answers it, counts the
decisions of both workers, also after a worker died and was replaced; the dead worker's gauges are dropped;
the parent removes the private metrics folder when it stops."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from servers import free_port, wait_for

from pdp.service.metrics import Metrics

pytestmark = pytest.mark.integration

PDP = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "pdp")


def _samples(text: str, name: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            found[labels] = float(value)
    return found


def _decisions(text: str) -> float:
    return sum(_samples(text, "pdp_decisions_total").values())


def _per_worker(text: str) -> dict[str, float]:
    return {k: v for k, v in _samples(text, "pdp_worker_decisions").items() if v > 0}


def _check(base: str) -> bool:
    # A new connection each time, so that the kernel spreads them over both workers.
    return bool(httpx.post(f"{base}/v1/check", json={"method": "GET", "path": "/healthz"}).json()["allowed"])


def test_every_scrape_counts_the_decisions_of_every_worker(write_setup, tmp_path):
    port = free_port()
    env = dict(os.environ, TMPDIR=str(tmp_path))
    server = subprocess.Popen([PDP, "serve", "--config", str(write_setup(engine="regorus")), "--workers", "2",
                               "--http", f"127.0.0.1:{port}", "--grpc", ""], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/healthz", timeout=60)
        (folder,) = tmp_path.glob("pdp-metrics-*")
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        sent = 0
        for _ in range(20):  # until both workers have answered some; bounded
            for _ in range(10):
                assert _check(base)
                sent += 1
            if len(_per_worker(httpx.get(f"{base}/metrics").text)) == 2:
                break
        else:
            pytest.fail("one worker answered every request: the test proves nothing")

        for _ in range(12):
            text = httpx.get(f"{base}/metrics").text
            assert _decisions(text) == sent
            assert sum(_per_worker(text).values()) == sent
            assert _samples(text, "pdp_store_up") == {"pdp_store_up": 1.0}

        # A worker dies and is replaced: what it counted still counts, its own gauges go.
        victim = int(next(iter(_per_worker(text))).split('pid="')[1].split('"')[0])
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            text = httpx.get(f"{base}/metrics").text
            if not any(f'pid="{victim}"' in k for k in _samples(text, "pdp_worker_decisions")):
                break
            assert time.monotonic() < deadline, "the dead worker's gauges were not dropped"
            time.sleep(0.2)
        for _ in range(5):
            assert _check(base)
        sent += 5
        for _ in range(6):
            assert _decisions(httpx.get(f"{base}/metrics").text) == sent
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err.decode()
    assert not list(tmp_path.glob("pdp-metrics-*")) and not list(tmp_path.glob("pdp-workers-*"))


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


def test_a_worker_started_after_its_metrics_folder_is_gone_still_serves(write_setup, tmp_path):
    """A temp-folder cleaner removed the folder: a replaced worker keeps its metrics in memory and serves."""
    port = free_port()
    env = dict(os.environ, TMPDIR=str(tmp_path))
    server = subprocess.Popen([PDP, "serve", "--config", str(write_setup(engine="regorus")), "--workers", "2",
                               "--http", f"127.0.0.1:{port}", "--grpc", ""], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/healthz", timeout=60)
        (folder,) = tmp_path.glob("pdp-metrics-*")
        shutil.rmtree(folder)
        before = _workers(server.pid)
        assert len(before) == 2
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(after := _workers(server.pid)) < 2 or set(after) & set(before):
            assert time.monotonic() < deadline and server.poll() is None, "the workers were not replaced"
            time.sleep(0.2)
        wait_for(f"{base}/healthz", timeout=30)
        assert all(_check(base) for _ in range(4))
        assert "pdp_decisions_total" in httpx.get(f"{base}/metrics").text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0
    assert "metrics folder" in err.decode()


def test_one_process_keeps_its_metrics_in_its_own_registry(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    metrics.set_policy("v1", "regorus")
    metrics.set_policy("v2", "regorus")
    text = metrics.render().decode()
    assert 'pdp_policy_info{engine="regorus",version="v2"} 1.0' in text and 'version="v1"' not in text
    assert "pdp_worker_decisions" not in text
    metrics.store_probed(False)
    metrics.store_probed(True)
    text = metrics.render().decode()
    assert "pdp_store_up 1.0" in text and 'pdp_store_failures_total{use="probe"} 1.0' in text
