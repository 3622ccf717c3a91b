"""``pdp bench``: set up, start the servers, measure in interleaved rounds, report, stop everything.

A round measures each pair floor first, then pdp: in process (CPU per operation), then the servers'
throughput at 16 in flight (gRPC with ``h2load``, ``/v1/check`` and ``/ext_authz`` with ``wrk``) for
one and for two processes, then latency at each fixed offered rate. Everything runs on loopback; every
loop and run is bounded in count and time; the servers are stopped and the scratch folder removed
however the run ends. The results (JSON and PNG) go to ``--out`` (a new folder under the system's
temporary folder by default), which is kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pdp.assemble import build_pdp
from pdp.bench import load, servers
from pdp.bench.inprocess import InProcess
from pdp.bench.report import DASH, TIMES, Row, Spec, machine, plot, table, write_json
from pdp.bench.workload import GRPC_PATH, PATH, Workload, prepare
from pdp.config import load_config

EXIT_OK, EXIT_ERROR = 0, 2
IN_FLIGHT = 16
#: At a fixed rate: a client (connection) per 100 req/s (h2load's rate timer ticks every 10 ms), each
#: with up to this many requests in flight over HTTP/2.
RATE_PER_CLIENT, GRPC_RATE_STREAMS = 100, 64
GRPC_HEADERS = {"content-type": "application/grpc", "te": "trailers"}
JSON_HEADERS = {"content-type": "application/json"}


@dataclass(frozen=True)
class Settings:
    rounds: int
    calls: int  # in-process calls per measurement (fresh credentials: a fifth of it)
    seconds: int  # each throughput run
    warmup: float  # each server's warm-up at the start, and h2load's before each timed run
    rate_seconds: float  # each fixed-rate run
    rates: tuple[int, ...]


FULL = Settings(rounds=3, calls=5000, seconds=5, warmup=1.0, rate_seconds=4.0, rates=(500, 1000, 2000))
QUICK = Settings(rounds=1, calls=300, seconds=1, warmup=0.2, rate_seconds=0.4, rates=(500, 1000))

TRANSPORTS = {"grpc": "gRPC Check", "http": "HTTP /v1/check", "ext_authz": "HTTP /ext_authz"}
FLOORS = {"grpc": "bare grpcio", "http": "bare uvicorn", "ext_authz": "bare uvicorn"}
ENGINE = "regorus eval_rule"


def specs(settings: Settings) -> list[Spec]:
    """Every row of the report, in order, with issue 9's targets."""
    out = [
        Spec("decide_cached", "cached decision: same certificate, token, request", ENGINE, "µs CPU", "lower",
             target=1.5, ceiling=40),
        Spec("decide_new_facts", "cached credentials, new facts (new path each time)", ENGINE, "µs CPU", "lower"),
        Spec("decide_new_token", "decision with a new ES256 token each time", "raw ES256 verify", "µs CPU",
             "lower", target=2.0),
        Spec("verify_new_cert", "new client certificate: certificates.verify", "raw chain verify",
             "µs CPU", "lower", target=2.0),
        Spec("decide_new_cert", "decision with a new certificate and its bound token",
             "raw chain + ES256", "µs CPU", "lower"),
    ]
    for transport, name in TRANSPORTS.items():
        for workers in (1, 2):
            target = (0.75 if transport == "grpc" else 0.6) if workers == 1 else None
            out.append(Spec(f"{transport}_w{workers}", f"{name}, {IN_FLIGHT} in flight, --workers {workers}",
                            f"{FLOORS[transport]} w{workers}", "req/s", "higher", target=target))
    for transport, name in TRANSPORTS.items():
        out.append(Spec(f"{transport}_scaling", f"{name}: --workers 2 / --workers 1",
                        f"{FLOORS[transport]} w2/w1", TIMES, "higher", target=1.8, scaling=True))
    for transport in ("grpc", "http"):
        for workers in (1, 2):
            for rate in settings.rates:
                for q in ("p50", "p99"):
                    judged = transport == "grpc" and workers == 1 and rate == 1000 and q == "p99"
                    out.append(Spec(f"{transport}_{q}_{rate}_w{workers}",
                                    f"{TRANSPORTS[transport]} at {rate} req/s, --workers {workers}: {q}",
                                    f"{FLOORS[transport]} w{workers}", "ms", "lower",
                                    target=2.0 if judged else None, must_sustain=judged))
    return out


class Run:
    """The servers, the in-process setup and the results of one ``pdp bench``."""

    def __init__(self, settings: Settings, scratch: Path, pool: servers.Servers,
                 say: Callable[[str], None]) -> None:
        self.settings = settings
        self.scratch = scratch
        self.pool = pool
        self.say = say
        self.rows = {s.id: Row(s) for s in specs(settings)}
        self.latency: list[dict[str, Any]] = []
        self.workload: Workload = prepare(scratch / "dev")
        self.files: dict[str, Path] = {}
        self.servers: dict[tuple[str, int], servers.Server] = {}

    def _file(self, name: str, data: bytes) -> Path:
        path = self.scratch / name
        path.write_bytes(data)
        self.files[name] = path
        return path

    # -- setup
    def start(self) -> None:
        w = self.workload
        self._file("grpc.bin", w.grpc_frame())
        self._file("check.json", w.check_document())
        threads = load_config(w.config).server.grpc_workers  # the bare gRPC server gets pdp's thread count
        for workers in (1, 2):
            self.servers["pdp", workers] = self.pool.pdp(w.config, workers)
        pdp1 = self.servers["pdp", 1]
        # The floors answer what pdp answers, byte for byte but for the decision id.
        response, body, headers = self._ready(pdp1)
        grpc_answer = self._file("grpc-answer.bin", response)
        spec = self._file("http-answers.json", json.dumps({"check_body": body.decode(),
                                                            "ext_authz_headers": headers}).encode())
        for workers in (1, 2):
            self.servers["grpc-floor", workers] = self.pool.grpc_floor(grpc_answer, workers, threads)
            self.servers["http-floor", workers] = self.pool.http_floor(spec, workers)
        for server in self.servers.values():
            self._ready(server)
        self._wrk_scripts(w.ext_authz_headers())
        self.say(f"servers up: {', '.join(s.name for s in self.servers.values())}; warming up")
        for (kind, _), server in self.servers.items():
            if kind != "http-floor":
                self._grpc_rate(server, rate=None, seconds=self.settings.warmup)
            if kind != "grpc-floor":
                self._h2load_http(server, seconds=self.settings.warmup)

    def _ready(self, server: servers.Server) -> tuple[bytes, bytes, dict[str, str]]:
        """Wait until ``server`` answers the workload's request on each of its listeners with an allow;
        the answers (gRPC, /v1/check, /ext_authz), empty for a listener it does not have."""
        w = self.workload
        grpc, body, headers = b"", b"", {}
        if server.grpc:
            message = w.grpc_message()
            grpc = servers.wait_until(server, lambda: servers.grpc_check(server.grpc, message), "gRPC answer")
        if server.http:
            document = w.check_document()
            body = servers.wait_until(server, lambda: servers.http_check(server.http, document), "HTTP answer")
            headers = servers.wait_until(
                server, lambda: servers.ext_authz(server.http, "/ext_authz" + PATH, w.ext_authz_headers()),
                "ext_authz answer")
        return grpc, body, headers

    def _wrk_scripts(self, ext_headers: dict[str, str]) -> None:
        load.wrk_script(self.scratch / "http.lua", "POST", JSON_HEADERS, self.files["check.json"])
        load.wrk_script(self.scratch / "ext_authz.lua", "GET", ext_headers)

    # -- one run of a load generator
    def _grpc_rate(self, server: servers.Server, *, rate: int | None, seconds: float) -> load.Result:
        url = f"http://127.0.0.1:{server.grpc}{GRPC_PATH}"
        log = self.scratch / "h2load.log"
        if rate is None:
            return load.h2load(url, self.files["grpc.bin"], GRPC_HEADERS, log, clients=IN_FLIGHT, streams=1,
                               seconds=seconds, warmup=min(self.settings.warmup, 1.0))
        clients = _rate_clients(rate)
        return load.h2load(url, self.files["grpc.bin"], GRPC_HEADERS, log, clients=clients,
                           streams=GRPC_RATE_STREAMS, requests=max(int(rate * seconds), clients),
                           rps=rate / clients)

    def _h2load_http(self, server: servers.Server, *, seconds: float, rate: int | None = None) -> load.Result:
        url = f"http://127.0.0.1:{server.http}/v1/check"
        log = self.scratch / "h2load.log"
        if rate is None:
            return load.h2load(url, self.files["check.json"], JSON_HEADERS, log, clients=IN_FLIGHT, seconds=seconds,
                               h1=True)
        clients = _rate_clients(rate)
        return load.h2load(url, self.files["check.json"], JSON_HEADERS, log, clients=clients,
                           requests=max(int(rate * seconds), clients), rps=rate / clients, h1=True)

    def _throughput(self, transport: str, server: servers.Server) -> load.Result:
        if transport == "grpc":
            return self._grpc_rate(server, rate=None, seconds=self.settings.seconds)
        path = "/v1/check" if transport == "http" else "/ext_authz" + PATH
        return load.wrk(f"http://127.0.0.1:{server.http}{path}", self.scratch / f"{transport}.lua",
                        connections=IN_FLIGHT, seconds=self.settings.seconds)

    def _record(self, result: load.Result, *, server: str, transport: str, workers: int, round_: int) -> None:
        self.latency.append({"server": server, "transport": transport, "workers": workers, "round": round_,
                             **result.as_dict()})

    # -- a round
    def round(self, number: int, inprocess: InProcess) -> None:
        s = self.settings
        for row_id, (floor, pdp) in inprocess.measure(s.calls).items():
            self.rows[row_id].floor.append(floor)
            self.rows[row_id].pdp.append(pdp)
        self.say(f"round {number}: in process done")
        rates: dict[tuple[str, str, int], float] = {}
        for transport in TRANSPORTS:
            for workers in (1, 2):
                for kind in ("floor", "pdp"):
                    server = self.servers[("pdp" if kind == "pdp" else
                                           "grpc-floor" if transport == "grpc" else "http-floor"), workers]
                    result = self._throughput(transport, server)
                    self._record(result, server=kind, transport=transport, workers=workers, round_=number)
                    rates[transport, kind, workers] = result.rate
                    row = self.rows[f"{transport}_w{workers}"]
                    (row.pdp if kind == "pdp" else row.floor).append(result.rate)
            row = self.rows[f"{transport}_scaling"]
            row.pdp.append(rates[transport, "pdp", 2] / rates[transport, "pdp", 1])
            row.floor.append(rates[transport, "floor", 2] / rates[transport, "floor", 1])
        self.say(f"round {number}: throughput done")
        for transport in ("grpc", "http"):
            for workers in (1, 2):
                for rate in s.rates:
                    achieved: dict[str, float] = {}
                    for kind in ("floor", "pdp"):
                        server = self.servers[("pdp" if kind == "pdp" else f"{transport}-floor"), workers]
                        if transport == "grpc":
                            result = self._grpc_rate(server, rate=rate, seconds=s.rate_seconds)
                        else:
                            result = self._h2load_http(server, seconds=s.rate_seconds, rate=rate)
                        self._record(result, server=kind, transport=transport, workers=workers, round_=number)
                        achieved[kind] = result.rate
                        for q, value in (("p50", result.p50_ms), ("p99", result.p99_ms)):
                            row = self.rows[f"{transport}_{q}_{rate}_w{workers}"]
                            (row.pdp if kind == "pdp" else row.floor).append(value)
                            if kind == "pdp":
                                row.sustained.append(result.sustained)
                                row.note = (f"reached {achieved['pdp']:,.0f} req/s (pdp), "
                                            f"{achieved['floor']:,.0f} (floor)")
        self.say(f"round {number}: fixed rates done")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


def _rate_clients(rate: int) -> int:
    return max(1, -(-rate // RATE_PER_CLIENT))


def _check_tools() -> str | None:
    packages = load.missing_tools()
    if packages:
        return (f"pdp bench needs h2load and wrk on the PATH; install them with: "
                f"apt-get install {' '.join(packages)}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "pdp bench draws its plot with matplotlib: pip install 'pdp[bench]'"
    return None


def settings_from(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    rates = tuple(int(r) for r in args.rates.split(",")) if args.rates else base.rates
    if any(r <= 0 for r in rates) or not rates:
        raise ValueError("--rates: positive request rates, comma-separated")
    if (args.rounds is not None and args.rounds < 1) or (args.seconds is not None and args.seconds < 1):
        raise ValueError("--rounds and --seconds must be at least 1")
    return Settings(rounds=args.rounds or base.rounds, calls=base.calls, seconds=args.seconds or base.seconds,
                    warmup=base.warmup, rate_seconds=base.rate_seconds if args.seconds is None else
                    float(args.seconds), rates=rates)


def main(args: argparse.Namespace) -> int:
    problem = _check_tools()
    if problem:
        print(problem, file=sys.stderr)
        return EXIT_ERROR
    settings = settings_from(args)
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:5.1f} s] {text}", file=sys.stderr, flush=True)

    scratch = Path(tempfile.mkdtemp(prefix="pdp-bench-scratch-"))
    # SIGTERM unwinds like Ctrl-C: the servers are stopped and the scratch folder removed on the way out.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with servers.Servers(scratch) as pool:
            run = Run(settings, scratch, pool, say)
            run.start()
            pdp = build_pdp(load_config(run.workload.config))
            try:
                inprocess = InProcess(run.workload, pdp)
                for number in range(1, settings.rounds + 1):
                    run.round(number, inprocess)
            finally:
                pdp.close()
    except (load.LoadError, servers.ServerError, RuntimeError) as exc:
        print(f"pdp bench: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(scratch, ignore_errors=True)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="pdp-bench-results-"))
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else out / "bench.json"
    png_path = out / "bench.png"
    rows = list(run.rows.values())
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    host = machine()
    info = {"date": now, "machine": host, "settings": {**asdict(settings), "quick": bool(args.quick),
                                                       "in_flight": IN_FLIGHT},
            "seconds": round(time.monotonic() - started, 1)}
    print(f"pdp bench, {now}: {host['cpu']}, {host['cores']} cores, load average at the end "
          f"{', '.join(f'{x:.1f}' for x in host['load_average'])}; {settings.rounds} round(s), median "
          f"(lowest{DASH}highest)\n")
    print(table(rows))
    write_json(json_path, rows, run.latency, info)
    plot(png_path, run.latency, f"pdp bench, {now}, {host['cpu']}, {host['cores']} cores")
    print(f"\nwrote {json_path} and {png_path}")
    return EXIT_OK
