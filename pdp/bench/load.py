"""The load generators: ``h2load`` (Debian's ``nghttp2-client``) and ``wrk``, run and read.

- gRPC ``Check`` goes over h2c with ``h2load``: the body is the length-prefixed protobuf message,
  ``content-type: application/grpc`` and ``te: trailers``, as a gRPC client sends it.
- HTTP throughput goes through ``wrk`` at a number of connections, with a Lua script that sets the
  method, the headers and the body and prints a JSON summary when done.
- Latency at a fixed offered rate goes through ``h2load --rps`` (per client; ``--h1`` for HTTP), with a
  per-request log (``--log-file``) from which p50 and p99 are read. h2load's rate timer ticks at most
  every 10 ms, so each client sends at most 100 req/s (one request a tick) and the clients connect
  1/rate apart, which spreads their ticks evenly. Over HTTP/2 each client may keep many streams open, so
  a slow server makes requests wait in its own queue, where they are timed; over HTTP/1.1 a connection
  carries one request at a time, and a request that waits for the one before it is not timed until sent
  (the rate reached then falls short of the rate offered, which the report shows).

Every run is bounded by a request count or a duration and by a timeout on the process.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: The tools, by the Debian package that has them.
TOOLS = {"h2load": "nghttp2-client", "wrk": "wrk"}
#: Time a load generator may take past its nominal duration before it is killed.
GRACE_SECONDS = 30.0
_MARK = "PDP-BENCH "


class LoadError(RuntimeError):
    """A load generator failed, or answered what cannot be read."""


def missing_tools() -> list[str]:
    """The Debian packages to install for the tools that are not on the PATH."""
    return [package for tool, package in TOOLS.items() if shutil.which(tool) is None]


@dataclass(frozen=True)
class Result:
    """One load run: requests answered with a 2xx, failures, seconds measured, and the latency."""

    ok: int
    failed: int
    seconds: float
    p50_ms: float
    p99_ms: float
    offered: float | None = None  # req/s asked for, None for a closed loop (a number in flight)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def sustained(self) -> bool:
        """Every request answered, at (nearly) the offered rate."""
        return self.failed == 0 and (self.offered is None or self.rate >= 0.95 * self.offered)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": round(self.rate, 1), "sustained": self.sustained}


def _run(command: list[str], timeout: float) -> str:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)  # noqa: S603
    except subprocess.TimeoutExpired as exc:  # run() has killed it
        raise LoadError(f"{command[0]} did not finish in {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise LoadError(f"{' '.join(command[:3])}... exited {proc.returncode}: {(proc.stderr or proc.stdout)[-500:]}")
    return proc.stdout


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def h2load(url: str, body: Path, headers: dict[str, str], log: Path, *, clients: int, streams: int = 1,
           seconds: float | None = None, warmup: float = 0.0, requests: int | None = None,
           rps: float | None = None, h1: bool = False) -> Result:
    """Run ``h2load`` for ``seconds`` (after ``warmup``) or for ``requests`` requests, at ``rps`` per
    client or as fast as ``clients`` x ``streams`` in flight allow."""
    command = ["h2load", "-t", "1", "-c", str(clients), "-m", str(streams), "-d", str(body),
               "--log-file", str(log)]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    if h1:
        command.append("--h1")
    if seconds is not None:
        command += ["-D", f"{round(seconds * 1000)}ms"]
        if warmup:
            command += ["--warm-up-time", f"{round(warmup * 1000)}ms"]
        nominal = seconds + warmup
    else:
        assert requests is not None
        command += ["-n", str(requests)]
        nominal = requests / (rps * clients) if rps else 60.0
    if rps is not None:
        # h2load's per-client rate timer ticks at most every 10 ms: at no more than 100 req/s a client
        # sends one request a tick, and clients connected 1/rate apart send at evenly spread times.
        command += ["--rps", f"{rps:g}", "-r", "1", "--rate-period", f"{max(1, round(1000 / (rps * clients)))}ms"]
    out = _run([*command, url], timeout=nominal + GRACE_SECONDS)
    finished = re.search(r"finished in ([\d.]+)(us|ms|s),", out)
    counts = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    statuses = re.search(r"status codes: (\d+) 2xx", out)
    if finished is None or counts is None or statuses is None:
        raise LoadError(f"unreadable h2load output: {out[-500:]}")
    total = float(finished.group(1)) / {"us": 1e6, "ms": 1e3, "s": 1.0}[finished.group(2)]
    # Timed runs: the rate is over the main duration; the warm-up counts in "finished in".
    measured = seconds if seconds is not None else total
    ok = int(statuses.group(1))
    failed = int(counts.group(5)) + int(counts.group(4)) - ok  # failed, and answered with another status
    latencies = [float(line.split("\t")[2]) / 1e3 for line in log.read_text().splitlines()
                 if line.count("\t") >= 2 and line.split("\t")[1].startswith("2")]
    log.unlink()
    if not latencies:
        raise LoadError(f"h2load got no successful answer from {url}: {out[-500:]}")
    offered = rps * clients if rps is not None else None
    return Result(ok, failed, measured, _percentile(latencies, 0.50), _percentile(latencies, 0.99), offered)


def wrk_script(path: Path, method: str, headers: dict[str, str], body: Path | None = None) -> Path:
    """A wrk Lua script sending ``method`` with ``headers`` (and the file ``body``), printing a summary."""
    def lua(text: str) -> str:
        if "]==]" in text or "\n" in text:
            raise ValueError(f"cannot quote {text[:40]!r} for Lua")
        return f"[==[{text}]==]"

    lines = [f"wrk.method = {lua(method)}"]
    if body is not None:
        lines.append(f"local f = assert(io.open({lua(str(body))}, 'rb')); wrk.body = f:read('*a'); f:close()")
    # wrk adds its own Host unless the script sets one under exactly that name: never two.
    lines += [f"wrk.headers[ {lua('Host' if name.lower() == 'host' else name)} ] = {lua(value)}"
              for name, value in headers.items()]
    lines.append(
        "done = function(summary, latency, requests)\n"
        "  local e = summary.errors\n"
        f"  io.write(string.format('{_MARK}" '{"requests":%d,"duration_us":%d,"status":%d,"socket":%d,'
        '"p50_us":%d,"p99_us":%d}\\n\', summary.requests, summary.duration, e.status,'
        " e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))\n"
        "end")
    path.write_text("\n".join(lines) + "\n")
    return path


def wrk(url: str, script: Path, *, connections: int, seconds: int) -> Result:
    """Run ``wrk`` with one thread and ``connections`` connections for ``seconds`` (at least 1)."""
    seconds = max(1, seconds)
    out = _run(["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "-s", str(script), url],
               timeout=seconds + GRACE_SECONDS)
    line = next((x for x in out.splitlines() if x.startswith(_MARK)), None)
    if line is None:
        raise LoadError(f"unreadable wrk output: {out[-500:]}")
    s = json.loads(line[len(_MARK):])
    failed = s["status"] + s["socket"]
    if s["requests"] - s["status"] <= 0:
        raise LoadError(f"wrk got no successful answer from {url}: {out[-500:]}")
    return Result(s["requests"] - s["status"], failed, s["duration_us"] / 1e6, s["p50_us"] / 1e3,
                  s["p99_us"] / 1e3)
