"""A redis-server of a test's own, on a free loopback port: for tests that fill Redis to its ``maxmemory``,
which the shared Redis on 6379 must never be."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from servers import free_port


@contextmanager
def own_redis(folder: Path, *, maxmemory: str = "2mb") -> Iterator[str]:
    """Start ``redis-server`` with ``maxmemory`` and ``noeviction``; yield its URL; stop it."""
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed (CI installs it: see .ci/run)"
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--maxmemory", maxmemory, "--maxmemory-policy", "noeviction", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def fill(url: str, value_size: int = 200, limit: int = 200_000) -> int:
    """Write filler keys, one command at a time, until Redis refuses for lack of memory; then pin
    ``maxmemory`` below what is used, so that the buffers freed after each command cannot bring it back
    under the limit for a moment. The number of keys written."""
    client = redis.Redis.from_url(url)
    try:
        for i in range(limit):
            try:
                client.set(f"filler:{i}", b"x" * value_size)
            except redis.exceptions.OutOfMemoryError:
                client.config_set("maxmemory", int(client.info("memory")["used_memory"]) * 9 // 10)
                return i
        raise AssertionError(f"Redis took {limit} keys without running out of memory")
    finally:
        client.close()
