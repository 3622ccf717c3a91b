"""A redis-server of a test's own on a free loopback port, which the test may stop, start again on the same
port, pause (SIGSTOP) and resume, or slow down (``DEBUG SLEEP``): never the shared Redis on 6379."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import redis
from servers import free_port


class RedisProcess:
    """``redis-server --port <free port> --save "" --appendonly no``, stopped by ``stop()`` or on exit."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisProcess:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed (CI installs it: see .ci/run)"
        self._proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 20
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self._proc.poll() is not None:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.resume()
            self._proc.terminate()
            self._proc.wait(timeout=10)
        self._proc = None

    def pause(self) -> None:
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGCONT)

    def sleep(self, seconds: float) -> threading.Thread:
        """``DEBUG SLEEP seconds`` from a client of its own, in a thread (joined by the caller): Redis answers
        nobody meanwhile."""
        def run() -> None:
            client = self.client()
            try:
                client.execute_command("DEBUG", "SLEEP", str(seconds))
            finally:
                client.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        time.sleep(0.1)  # the command has reached Redis
        return thread

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
