"""Measure pdp's decision costs and print the figures.

    .venv/bin/python benchmarks/decide.py [--n 5000] [--http-requests 2000]

Prints CPU microseconds per operation (``time.process_time``, so other load on
the machine counts less than with wall time): a cached-path decision (a
returning client: chain and token already verified) per engine, its parts,
the uncached chain and token verifications, and the HTTP ``/v1/check``
throughput of one ``pdp serve`` process. Every loop is bounded in count.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import httpx

from pdp.assemble import build_pdp
from pdp.certificates.pem import pem_to_der_chain
from pdp.config import load_config
from pdp.devinit import dev_init
from pdp.devpki import TokenIssuer, load_private_key
from pdp.pipeline import Pdp
from pdp.policy.input import build_input
from pdp.request import CheckRequest


def cpu_us(fn: Callable[[], object], n: int) -> float:
    fn()
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_throughput(dev: Path, requests: int, workers: int, processes: int = 1) -> tuple[float, float]:
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "pdp"), "serve", "--config", str(dev / "pdp.toml"),
                             "--http", f"127.0.0.1:{port}", "--grpc", "", "--log-level", "warning",
                             "--workers", str(processes)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        body = json.dumps({"method": "GET", "path": "/orders", "host": "api.example.org",
                           "client_cert": (dev / "client.pem").read_text(),
                           "headers": {"authorization": "Bearer " + (dev / "token.jwt").read_text().strip()}})
        per_worker = requests // workers

        def run() -> list[float]:
            latencies = []
            with httpx.Client(base_url=base, headers={"content-type": "application/json"}) as client:
                for _ in range(per_worker):
                    t = time.perf_counter()
                    r = client.post("/v1/check", content=body)
                    latencies.append(time.perf_counter() - t)
                    assert r.json()["allowed"], r.text
            return latencies

        run()  # warm up the server's per-thread policy copies
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            lat = sorted(x for chunk in pool.map(lambda _: run(), range(workers)) for x in chunk)
        elapsed = time.perf_counter() - start
        return len(lat) / elapsed, lat[int(len(lat) * 0.99)] * 1e3
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def engine_pdp(dev: Path, engine: str) -> Pdp:
    cfg_path = dev / f"pdp-{engine}.toml"
    cfg_path.write_text(re.sub(r'engine = "\w+"', f'engine = "{engine}"', (dev / "pdp.toml").read_text()))
    pdp = build_pdp(load_config(cfg_path))
    pdp.decision_log.enabled = False
    return pdp


def decision_rows(pdp: Pdp, engine: str, chain: tuple[bytes, ...], token: str, headers: Mapping[str, str],
                  n: int) -> list[tuple[str, float]]:
    def request() -> CheckRequest:
        return CheckRequest(method="GET", path="/orders?page=2", host="api.example.org", time=time.time(),
                            headers=headers, client_cert_chain=chain)

    decision = pdp.decide(request())
    assert decision.allowed, decision.explanation()
    req = request()
    identity = pdp.certificates.verify(chain, req.time)
    verified = pdp.tokens.verify(token, req.time)
    doc = build_input(req, identity, verified, {"method": "x5t#S256", "bound": True})
    return [(f"{engine}: cached-path decide()", cpu_us(lambda: pdp.decide(request()), n)),
            (f"{engine}: policy evaluation alone", cpu_us(lambda: pdp.policy.evaluate(doc), n))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--http-requests", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()

    dev = Path(tempfile.mkdtemp(prefix="pdp-bench-")) / "dev"
    dev_init(dev)
    chain = pem_to_der_chain((dev / "client.pem").read_bytes())
    token = (dev / "token.jwt").read_text().strip()
    headers = MappingProxyType({"authorization": f"Bearer {token}", "user-agent": "bench",
                                "accept": "*/*", "x-request-id": "4f1c2b"})
    rows: list[tuple[str, float]] = []
    for engine in ("regopy", "regorus"):
        pdp = engine_pdp(dev, engine)
        rows += decision_rows(pdp, engine, chain, token, headers, args.n)
    req = CheckRequest(method="GET", path="/orders", host="api.example.org", time=time.time(), headers=headers,
                       client_cert_chain=chain)
    identity = pdp.certificates.verify(chain, req.time)
    verified = pdp.tokens.verify(token, req.time)
    rows.append(("build_input", cpu_us(lambda: build_input(req, identity, verified, {"bound": True}), args.n)))
    rows.append(("cached chain look-up (sha256 + cache)", cpu_us(lambda: pdp.certificates.verify(chain, req.time),
                                                                   args.n)))
    rows.append(("cached token look-up (sha256 + cache)", cpu_us(lambda: pdp.tokens.verify(token, req.time),
                                                                   args.n)))
    small = max(args.n // 20, 50)
    rows.append(("uncached chain validation + identity",
                 cpu_us(lambda: pdp.certificates._verify_uncached(chain, req.time), small)))
    issuer = TokenIssuer("https://issuer.example.org", load_private_key((dev / "issuer.key").read_bytes()), "dev-1")
    fresh = [issuer.mint(audience="https://api.example.org") for _ in range(small + 1)]
    it = iter(fresh)
    rows.append(("uncached token verification (ES256)", cpu_us(lambda: pdp.tokens.verify(next(it), req.time),
                                                                small)))

    print(f"{'operation':48s} {'CPU µs/op':>10s}")
    for name, value in rows:
        print(f"{name:48s} {value:10.1f}")
    print(f"peak RSS after the in-process runs: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.http_requests:
        for engine in ("regopy", "regorus"):
            text = re.sub(r'engine = "\w+"', f'engine = "{engine}"', (dev / "pdp.toml").read_text())
            (dev / "pdp.toml").write_text(text)
            rps, p99 = http_throughput(dev, args.http_requests, args.workers)
            print(f"HTTP /v1/check, one process, {engine}, {args.workers} clients: {rps:,.0f} req/s, p99 {p99:.1f} ms")
        rps, p99 = http_throughput(dev, args.http_requests, args.workers, processes=2)
        print(f"HTTP /v1/check, pdp serve --workers 2, regorus, {args.workers} clients: {rps:,.0f} req/s, "
              f"p99 {p99:.1f} ms")


if __name__ == "__main__":
    main()
