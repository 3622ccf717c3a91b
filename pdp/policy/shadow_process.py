"""The shadow policy's own process: its evaluations never on a request's path.

The regorus engine holds the GIL for a whole evaluation, so a slow shadow policy evaluated in the
served process would stall every thread of it (the event loop, ``/healthz``, the other decisions), and
a thread of its own would not help. The shadow is evaluated in a child process instead
(``python -I -m pdp.policy.shadow_process PARENT_PID``), which compiles the bundle itself (the parent
has run the load checks on it) and keeps the shadow's decision cache. A decision only puts its input
on a bounded queue (``ShadowProcess.submit``; a full queue is the caller's to count as skipped); one
thread of the parent hands the inputs to the child one at a time and gives each answer, or the text
of its failure, to ``answer``.

A child that dies is replaced at the next input; one that takes longer than ``timeout`` on an input
is killed and replaced, and that input's answer is an error. A new shadow version (a reload) gets a
child of its own at the next input. The child dies with its parent: Linux's ``PR_SET_PDEATHSIG``
(the thread that started it lives as long as the ``ShadowProcess``), and the end of its standard
input on every system.

Messages are JSON lines. To the child: the bundle first (``{"bundle": ..., "cache_size": n}``), then
``{"input": doc}`` per evaluation. From the child: ``{"ready": version}`` once compiled, then
``{"outcome": ...}`` or ``{"error": text}`` per input.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import queue
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import IO, Any

from pdp.policy.engine import PolicyBundle, PolicyEngine
from pdp.policy.result import PolicyOutcome, decided_outcome

log = logging.getLogger("pdp.policy.shadow")

_dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode

#: Inputs waiting for the shadow at most; past it a decision's comparison is skipped (and counted).
QUEUE_SIZE = 100
#: How long a new child may take to compile the bundle.
START_SECONDS = 60.0
#: After a child that could not start, the next try waits this long (its inputs are errors meanwhile).
RESTART_DELAY = 1.0
#: The longest answer read from the child.
MAX_ANSWER = 64 * 1024 * 1024

#: What becomes of one input: its context (the caller's), the shadow's outcome or the text of its
#: failure, and the shadow version that gave it.
Answer = Callable[[Any, "PolicyOutcome | str", str], None]


class _Failed(Exception):
    """The child could not answer: it died, hung or said something that is no answer."""


class _Child:
    """One child process and its two pipes, read and written without blocking past a deadline."""

    def __init__(self, engine: PolicyEngine) -> None:
        self.version = engine.version
        # -I: the child imports the installed pdp, never a pdp/ folder in the working directory.
        self.proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            [sys.executable, "-I", "-m", "pdp.policy.shadow_process", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in, self._out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self._in, False)
        self._writable, self._readable = selectors.DefaultSelector(), selectors.DefaultSelector()
        self._writable.register(self._in, selectors.EVENT_WRITE)
        self._readable.register(self._out, selectors.EVENT_READ)
        self._buffer = bytearray()
        self._stopped = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exchange(self, message: bytes, seconds: float) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        self._send(message, deadline)
        return self._receive(deadline)

    def _send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            if not self._writable.select(max(0.0, deadline - time.monotonic())):
                raise TimeoutError
            try:
                view = view[os.write(self._in, view):]
            except BlockingIOError:
                continue
            except OSError as exc:  # the child is gone (EPIPE)
                raise _Failed(self._gone()) from exc

    def _receive(self, deadline: float) -> dict[str, Any]:
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > MAX_ANSWER:
                raise _Failed(f"the shadow's answer is longer than {MAX_ANSWER} bytes")
            if not self._readable.select(max(0.0, deadline - time.monotonic())):
                raise TimeoutError
            chunk = os.read(self._out, 1 << 20)
            if not chunk:
                raise _Failed(self._gone())
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise _Failed("the shadow evaluator's answer is not a JSON object")
        return answer

    def _gone(self) -> str:
        try:
            code = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "the shadow evaluator stopped answering"
        return f"the shadow evaluator exited ({f'signal {-code}' if code < 0 else f'status {code}'})"

    def kill(self) -> None:
        """Kill the process (from any thread); its pipes are closed by ``stop``, in the thread that reads them."""
        with contextlib.suppress(OSError):
            self.proc.kill()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5.0)
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()
        self._writable.close()
        self._readable.close()


class ShadowProcess:
    """The shadow policy's child process and the queue that feeds it (the module docstring)."""

    def __init__(self, engine: PolicyEngine, answer: Answer, *, timeout: float = 1.0,
                 queue_size: int = QUEUE_SIZE, cache_size: int = 0) -> None:
        #: The shadow in force: a child for another version is replaced at the next input.
        self.engine = engine
        self.timeout = timeout
        self.cache_size = cache_size
        self._answer = answer
        self._queue: queue.Queue[tuple[Mapping[str, Any], Any] | None] = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._child: _Child | None = None
        self._closed = False
        self._failed_at = -RESTART_DELAY
        self._failure = ""

    @property
    def pid(self) -> int | None:
        """The child's process id, while there is one."""
        child = self._child
        return child.pid if child is not None else None

    def submit(self, doc: Mapping[str, Any], context: Any) -> bool:
        """Queue ``doc`` for the shadow; False (and nothing queued) when the queue is full or closed.
        Never blocks: the thread and the child start with the first input."""
        with self._lock:
            if self._closed:
                return False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pdp-shadow", daemon=True)
                self._thread.start()
            self._pending += 1
        try:
            self._queue.put_nowait((doc, context))
        except queue.Full:
            self._done()
            return False
        return True

    def drain(self, timeout: float) -> bool:
        """Wait until every queued input is answered; False if some are still waiting after ``timeout``."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Drop the inputs still queued, stop the child and the thread (``Pdp.close``)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread, child = self._thread, self._child
        while True:
            try:
                if self._queue.get_nowait() is not None:
                    self._done()
            except queue.Empty:
                break
        if child is not None:  # ends an evaluation in progress at once (the thread then closes the pipes)
            child.kill()
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=10.0)
            if thread.is_alive():
                return
        self._stop_child()

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            if self._pending <= 0:
                self._idle.notify_all()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            doc, context = item
            engine = self.engine
            try:
                result = self._evaluate(engine, doc)
            except Exception as exc:  # whatever it is, an error of the shadow, never the thread's end
                self._stop_child()
                result = f"{type(exc).__name__}: {str(exc)[:200]}"
            try:
                if not self._closed:
                    self._answer(context, result, engine.version)
            except Exception:
                log.exception("comparing the shadow's answer failed")
            finally:
                self._done()
        self._stop_child()

    def _evaluate(self, engine: PolicyEngine, doc: Mapping[str, Any]) -> PolicyOutcome | str:
        child = self._child
        if child is not None and (child.version != engine.version or child.proc.poll() is not None):
            self._stop_child()  # a new shadow version (a reload), or a child that died since its last answer
            child = None
        if child is None:
            child = self._start(engine)
            if child is None:
                return self._failure
        try:
            answer = child.exchange((_dumps({"input": doc}) + "\n").encode(), self.timeout)
        except TimeoutError:
            self._stop_child()
            log.warning("the shadow policy took longer than %g s on decision input; its process was replaced",
                        self.timeout)
            return f"timed out after {self.timeout:g} s (policy.shadow.timeout); the shadow evaluator was replaced"
        except _Failed as exc:
            self._stop_child()
            log.warning("%s; it is replaced", exc)
            return str(exc)
        if "outcome" in answer and isinstance(answer["outcome"], dict):
            return decode_outcome(answer["outcome"])
        return str(answer.get("error") or "the shadow evaluator gave no outcome")[:400]

    def _start(self, engine: PolicyEngine) -> _Child | None:
        if time.monotonic() - self._failed_at < RESTART_DELAY:
            return None
        bundle = engine.bundle
        spec = {"bundle": {"modules": bundle.modules, "data": bundle.data, "entrypoint": bundle.entrypoint,
                           "engine": bundle.engine, "rego_version": bundle.rego_version},
                "cache_size": self.cache_size}
        child = _Child(engine)
        with self._lock:
            closed = self._closed
            if not closed:
                self._child = child
        if closed:
            child.stop()
            self._failure = "the shadow evaluator is closed"
            return None
        try:
            answer = child.exchange((_dumps(spec) + "\n").encode(), START_SECONDS)
            if answer.get("ready") != engine.version:
                raise _Failed(str(answer.get("error") or "no ready answer")[:400])
        except (TimeoutError, _Failed) as exc:
            self._stop_child()
            self._failed_at = time.monotonic()
            self._failure = f"the shadow evaluator could not start: {exc or 'timed out'}"
            log.warning("%s", self._failure)
            return None
        return child

    def _stop_child(self) -> None:
        with self._lock:
            child, self._child = self._child, None
        if child is not None:
            child.stop()


def encode_outcome(outcome: PolicyOutcome) -> dict[str, Any]:
    """What the parent compares of an outcome (everything but ``dynamic_metadata``), as JSON values."""
    return {f.name: getattr(outcome, f.name) for f in fields(PolicyOutcome) if f.name != "dynamic_metadata"}


def decode_outcome(value: Mapping[str, Any]) -> PolicyOutcome:
    def pairs(name: str) -> tuple[tuple[str, str], ...]:
        return tuple((str(k), str(v)) for k, v in value.get(name) or ())

    status = value.get("http_status")
    return PolicyOutcome(
        allowed=value.get("allowed") is True, reason=value.get("reason"), headers=dict(value.get("headers") or {}),
        response_headers=dict(value.get("response_headers") or {}),
        headers_to_remove=tuple(value.get("headers_to_remove") or ()),
        http_status=status if isinstance(status, int) else None, body=str(value.get("body") or ""),
        query_to_set=pairs("query_to_set"), query_to_remove=tuple(value.get("query_to_remove") or ()),
        more_headers=pairs("more_headers"), more_response_headers=pairs("more_response_headers"),
        scope=value.get("scope"))


# -- the child


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL when the parent's thread that started this process ends (the parent's death)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent and os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _reply(out: IO[bytes], message: dict[str, Any]) -> None:
    out.write((_dumps(message) + "\n").encode())
    out.flush()


def _evaluate(engine: PolicyEngine, doc: dict[str, Any]) -> dict[str, Any]:
    return {"outcome": encode_outcome(decided_outcome(engine, doc)[0])}


def main(argv: list[str]) -> int:
    _die_with_parent(int(argv[1]) if len(argv) > 1 and argv[1].isdigit() else 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C on the server's terminal is the parent's to handle
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever else writes to standard output cannot break the replies
    requests = sys.stdin.buffer
    line = requests.readline()
    if not line:
        return 0
    try:
        spec = json.loads(line)
        b = spec["bundle"]
        bundle = PolicyBundle(tuple((str(n), str(s)) for n, s in b["modules"]), b["data"], b["entrypoint"],
                              b["engine"], b["rego_version"])
        engine = PolicyEngine(bundle, decision_cache_size=int(spec["cache_size"]))
    except Exception as exc:
        _reply(replies, {"error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        return 1
    _reply(replies, {"ready": engine.version})
    while line := requests.readline():
        try:
            reply = _evaluate(engine, json.loads(line)["input"])
        except Exception as exc:  # the shadow's failure is an answer like any other
            reply = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        _reply(replies, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
