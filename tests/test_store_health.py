"""pdp.service.store_health: the store probe behind /readyz and pdp_store_up, spaced in time, naming no address."""

from __future__ import annotations

from pathlib import Path

from servers import free_port

from pdp.service.store_health import StoreHealth
from pdp.store import MemoryStore, RedisStore, SqliteStore, UnavailableStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_store_is_probed_at_most_once_per_interval():
    clock, told = Clock(), []
    health = StoreHealth(MemoryStore(), interval=1.0, on_probe=told.append, clock=clock)
    for _ in range(50):
        assert health.state().ok
    assert health.probes == 1 and told == [True]
    clock.now += 1.0
    health.state()
    assert health.probes == 2


def test_a_store_that_does_not_answer_is_down_with_a_text_that_names_nothing(tmp_path: Path):
    port = free_port()
    told: list[bool] = []
    for store in (RedisStore(f"redis://127.0.0.1:{port}/0", timeout=0.2),
                  UnavailableStore(f"the shared worker store {str(tmp_path)!r} is gone or was replaced")):
        state = StoreHealth(store, on_probe=told.append).state()
        assert not state.ok and state.error == "the shared store is unavailable"
        assert str(port) not in str(state.as_dict()) and str(tmp_path) not in str(state.as_dict())
    assert told == [False, False]


def test_the_kind_of_store_is_named(tmp_path: Path):
    assert StoreHealth(MemoryStore()).state().as_dict() == {"ok": True, "kind": "memory"}
    store = SqliteStore(tmp_path / "s.sqlite3")
    try:
        assert StoreHealth(store).state().as_dict() == {"ok": True, "kind": "sqlite"}
    finally:
        store.close()
