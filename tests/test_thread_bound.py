"""A regorus engine is freed on the thread that made it, wherever the last reference to it goes.

regorus's engines are pyo3 ``unsendable``: freed on another thread, pyo3 leaks them and prints a
traceback on the console ("Exception ignored … is unsendable, but is being dropped on another thread").
Each test here makes an engine on one thread and lets go of it on another, the ways a server does: a
policy error handed from a worker thread to the event loop, a reference cycle freed by the garbage
collector on whatever thread runs it, a worker thread that ends while something else still holds its
engine.
"""

from __future__ import annotations

import gc
import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest

from pdp.policy import thread_bound
from pdp.policy.engine import PolicyBundle, PolicyEngine, PolicyEvalError
from pdp.policy.rego import RegorusEvaluator

_FAILING = """package pdp.authz
import rego.v1
result := {"allowed": true} if { to_number(input.x) > 0 }
"""


def _bundle() -> PolicyBundle:
    return PolicyBundle((("p.rego", _FAILING),), {}, "data.pdp.authz.result", "regorus")


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every unraisable exception raised while the test runs (a foreign drop is one)."""
    seen: list[str] = []
    monkeypatch.setattr("sys.unraisablehook", lambda u: seen.append(f"{u.exc_type.__name__}: {u.exc_value}"))
    return seen


def _on_thread(work: Callable[[], Any]) -> Any:
    """``work()`` on a thread of its own, which has ended when this returns."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(work()))
    thread.start()
    thread.join()
    return box[0]


def test_an_evaluator_whose_thread_ended_is_kept_without_a_traceback(unraisable: list[str]) -> None:
    kept = thread_bound.kept_count()
    evaluator = _on_thread(lambda: RegorusEvaluator(_bundle()))
    del evaluator
    gc.collect()
    assert unraisable == []
    assert thread_bound.kept_count() == kept + 1


def test_an_evaluator_dropped_elsewhere_is_freed_by_its_own_thread(unraisable: list[str]) -> None:
    jobs: queue.Queue[Callable[[], Any] | None] = queue.Queue()
    answers: queue.Queue[Any] = queue.Queue()

    def worker() -> None:
        while (job := jobs.get()) is not None:
            answers.put(job())

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        jobs.put(lambda: RegorusEvaluator(_bundle()))
        evaluator = answers.get(timeout=30)
        owner = evaluator._engine._thread
        kept = thread_bound.kept_count()
        del evaluator  # the last reference, on this thread: handed back to the worker
        assert unraisable == []
        assert len(owner.orphans) == 1
        jobs.put(lambda: thread_bound.thread_cache("evaluators"))  # the worker's next evaluation
        answers.get(timeout=30)
        assert owner.orphans == []
        assert thread_bound.kept_count() == kept
    finally:
        jobs.put(None)
        thread.join()
    assert unraisable == []


def test_a_policy_error_kept_after_its_worker_thread_ended_frees_nothing_on_the_wrong_thread(
        unraisable: list[str]) -> None:
    """The error's traceback holds the evaluator's frame; the worker's cache is gone with the worker."""
    engine = PolicyEngine(_bundle())

    def fail() -> BaseException:
        try:
            engine.evaluate({"x": "not a number"})
        except PolicyEvalError as exc:
            return exc
        raise AssertionError("the policy should have raised")

    error = _on_thread(fail)
    assert "to_number" in str(error)
    del error
    gc.collect()
    assert unraisable == []


def test_an_evaluator_in_a_reference_cycle_collected_on_another_thread(unraisable: list[str]) -> None:
    def make_cycle() -> bool:
        evaluator = RegorusEvaluator(_bundle())
        holder: dict[str, Any] = {"evaluator": evaluator}
        holder["self"] = holder  # only the garbage collector frees this, on whatever thread it runs
        return True

    gc.disable()  # so that the cycle outlives the thread that made it
    try:
        _on_thread(make_cycle)
    finally:
        gc.enable()
    gc.collect()
    assert unraisable == []


def test_evaluators_in_a_thread_cache_are_freed_on_their_thread_when_it_ends(unraisable: list[str]) -> None:
    kept = thread_bound.kept_count()
    engine = PolicyEngine(_bundle())
    _on_thread(lambda: engine.evaluate({"x": "1"}))
    gc.collect()
    assert unraisable == []
    assert thread_bound.kept_count() == kept


def test_engines_of_threads_still_running_at_exit_are_kept_without_a_traceback() -> None:
    """At exit the interpreter clears the threads still running (daemon threads) from the main thread:
    their engines, the policy's and ``re_match``'s, are kept rather than freed there, and nothing is
    printed."""
    import subprocess
    import sys

    script = """
import threading, time
from pdp.policy.engine import PolicyBundle, PolicyEngine
policy = 'package p\\nx := re_match("a+", input.s)\\n'
engine = PolicyEngine(PolicyBundle((("p.rego", policy),), {}, "data.p.x", "regorus", "v0"))
ready = threading.Event()
def serve():
    assert engine.evaluate({"s": "aaa"}) is True
    ready.set()
    time.sleep(60)
threading.Thread(target=serve, daemon=True).start()
assert ready.wait(30)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")


def test_engines_kept_after_their_thread_ended_are_not_freed_at_exit() -> None:
    """A kept engine can never be freed on its own thread: not at exit either, where the interpreter's
    teardown would free it on the main thread and pyo3 print a line for it."""
    import subprocess
    import sys

    script = """
import threading
from pdp.policy import thread_bound
from pdp.policy.engine import PolicyBundle
from pdp.policy.rego import RegorusEvaluator
bundle = PolicyBundle((("p.rego", "package p\\nimport rego.v1\\nx := 1\\n"),), {}, "data.p.x", "regorus")
box = []
worker = threading.Thread(target=lambda: box.append(RegorusEvaluator(bundle)))
worker.start()
worker.join()
box.clear()
assert thread_bound.kept_count() == 1
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
