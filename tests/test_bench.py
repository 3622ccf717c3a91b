"""``pdp bench``: run as a report, never as a pass/fail on timings.

The quick mode starts the real servers and load generators; what is checked is that it finishes, that
every row has figures, that the plot is a PNG, and that it leaves no process and no scratch folder behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdp.bench.run import QUICK, specs

PDP = str(Path(sys.executable).parent / "pdp")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _processes_naming(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


@pytest.mark.integration
def test_quick_bench_reports_every_row_and_a_plot_and_cleans_up(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.run([PDP, "bench", "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, env=env, check=False)
    print(proc.stdout)  # the report, for whoever reads the test log
    assert proc.returncode == 0, proc.stderr[-3000:]

    doc = json.loads((out / "bench.json").read_text())
    rows = {row["id"]: row for row in doc["rows"]}
    assert set(rows) == {spec.id for spec in specs(QUICK)}
    for row in rows.values():
        for side in ("pdp", "floor", "ratio"):
            assert row[side]["median"] > 0, (row["id"], side, row[side])
            assert all(x > 0 for x in row[side]["runs"]), (row["id"], side)
        assert row["met"] in (True, False, None)
    assert {(x["server"], x["transport"], x["workers"]) for x in doc["latency"]} == {
        (server, transport, workers) for server in ("pdp", "floor") for transport in ("grpc", "http", "ext_authz")
        for workers in (1, 2)}
    assert all(x["ok"] > 0 and x["p99_ms"] > 0 for x in doc["latency"])
    assert doc["machine"]["cores"] and doc["date"]

    assert (out / "bench.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "pdp/floor" in proc.stdout and "cached decision" in proc.stdout
    # Everything it started is stopped, and its scratch folder (the dev setup, logs, bodies) is gone.
    assert list(tmp.iterdir()) == []
    assert _processes_naming(str(tmp)) == []


def test_bench_names_the_packages_to_install_when_the_load_generators_are_missing(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # neither h2load nor wrk there
    proc = subprocess.run([PDP, "bench", "--quick", "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 2
    assert "apt-get install nghttp2-client wrk" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bench_refuses_nonsense_settings(tmp_path):
    proc = subprocess.run([PDP, "bench", "--rates", "0,500", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "--rates" in proc.stderr
