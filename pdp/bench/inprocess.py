"""CPU per operation in this process: pdp's decisions and verifications, each beside its floor.

Time is ``time.process_time`` (CPU of this process), so other load on the machine counts less than it
would in wall time. Decisions run as served: the decision log writes its line (to the null device), the
caches are on. Each loop is bounded in count and in time.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pdp.bench import floors
from pdp.bench.workload import Workload
from pdp.pipeline import Pdp
from pdp.request import CheckRequest
from pdp.service.decision_log import DecisionStream

#: No single measurement loop runs longer than this (wall time), whatever its count.
MAX_LOOP_SECONDS = 20.0


class BenchError(RuntimeError):
    """The benchmark cannot measure what it set out to (a denied request, a missing tool)."""


def cpu_us(fn: Callable[[], object], n: int, max_seconds: float = MAX_LOOP_SECONDS) -> float:
    """CPU microseconds per call of ``fn`` over at most ``n`` calls (after one untimed call)."""
    fn()
    gc.collect()
    deadline = time.monotonic() + max_seconds
    done = 0
    start = time.process_time()
    while done < n:
        fn()
        done += 1
        if done % 64 == 0 and time.monotonic() > deadline:
            break
    return (time.process_time() - start) / done * 1e6


@contextlib.contextmanager
def decision_lines_to_null() -> Iterator[None]:
    """The decision log on, as ``pdp serve`` has it, its lines going to the null device."""
    logger = logging.getLogger("pdp.decisions")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    with open(os.devnull, "w") as null:
        logger.handlers = [DecisionStream(null)]  # the handler pdp serve writes its lines with
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            yield
        finally:
            logger.handlers, logger.propagate = saved[0], saved[2]
            logger.setLevel(saved[1])


def _allowed(pdp: Pdp, request: CheckRequest) -> None:
    decision = pdp.decide(request)
    if not decision.allowed:
        raise BenchError(f"the benchmark's request was denied: {decision.reason}: {decision.message}")


def policy_input(pdp: Pdp, request: CheckRequest) -> dict[str, Any]:
    """The input document pdp hands its policy engine for ``request`` (the first decision on it)."""
    policy = pdp.policy
    evaluate = policy.evaluate
    seen: list[dict[str, Any]] = []

    def record(doc: dict[str, Any]) -> Any:
        seen.append(doc)
        return evaluate(doc)

    setattr(policy, "evaluate", record)  # noqa: B010 (an instance attribute over the method, for one decision)
    try:
        _allowed(pdp, request)
    finally:
        delattr(policy, "evaluate")
    if not seen:
        raise BenchError("pdp decided without evaluating the policy: no input to hand the engine")
    return seen[-1]


@dataclass(frozen=True)
class Pair:
    """One row measured in process: the floor and pdp, each a zero-argument call, and how many calls."""

    row: str
    floor: Callable[[], object]
    pdp: Callable[[], object]
    n: int


class InProcess:
    """pdp built from the workload's config, and the floors built from the same keys and input."""

    def __init__(self, workload: Workload, pdp: Pdp) -> None:
        self.workload = workload
        self.pdp = pdp
        self._paths = 0
        with decision_lines_to_null():
            doc = policy_input(pdp, workload.check_request())
        bundle = pdp.policy.bundle
        self.engine = floors.engine_eval(bundle.modules, bundle.data, bundle.entrypoint, doc)
        self.es256 = floors.es256_verify(workload.issuer.key.public_key(), workload.token)
        self.chain = floors.chain_verify(workload.ca.cert, workload.client.der)

    def pairs(self, n: int) -> list[Pair]:
        """This round's pairs; fresh certificates and tokens are minted here, outside the timed loops."""
        w, pdp = self.workload, self.pdp
        fresh = max(n // 5, 20)
        tokens = iter([w.new_token() for _ in range(fresh + 1)])
        chains = iter([(w.new_client().der,) for _ in range(fresh + 1)])
        clients = [w.new_client() for _ in range(fresh + 1)]  # others: none of them verified before
        bound = iter([((c.der,), w.new_token(c)) for c in clients])

        def cached() -> None:
            _allowed(pdp, w.check_request())

        def new_facts() -> None:
            self._paths += 1
            _allowed(pdp, w.check_request(f"/orders/{self._paths}"))

        def new_token() -> None:
            _allowed(pdp, w.check_request(token=next(tokens)))

        def new_cert() -> None:
            pdp.certificates.verify(next(chains), time.time())

        def new_cert_and_token() -> None:
            chain, token = next(bound)
            _allowed(pdp, w.check_request(chain=chain, token=token))

        def chain_and_es256() -> None:
            self.chain()
            self.es256()

        return [Pair("decide_cached", self.engine, cached, n),
                Pair("decide_new_facts", self.engine, new_facts, n),
                Pair("decide_new_token", self.es256, new_token, fresh),
                Pair("verify_new_cert", self.chain, new_cert, fresh),
                Pair("decide_new_cert", chain_and_es256, new_cert_and_token, fresh)]

    def measure(self, n: int) -> dict[str, tuple[float, float]]:
        """One round: each pair's floor, then pdp, in CPU µs per operation."""
        out: dict[str, tuple[float, float]] = {}
        with decision_lines_to_null():
            for pair in self.pairs(n):
                floor = cpu_us(pair.floor, pair.n)
                out[pair.row] = (floor, cpu_us(pair.pdp, pair.n))
        return out
