"""The store's named maps and their change notices, the same on every store: in memory, the SQLite file of
``pdp serve --workers`` (one process writing, another reading) and Redis (the shared one, under a prefix)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REDIS_URL

from pdp.store import (
    SHARED_TABLE,
    MemoryStore,
    RedisStore,
    SqliteStore,
    Store,
    StoreUnavailable,
    UnavailableStore,
)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def two_clients(request: pytest.FixtureRequest, tmp_path: Path, prefix: str) -> Iterator[tuple[Store, Store]]:
    """Two handles on one store: a writer and a reader, as two replicas (or two workers) hold them."""
    if request.param == "memory":
        store = MemoryStore()
        yield store, store
    elif request.param == "sqlite":
        parent = SqliteStore(tmp_path / "state.sqlite3", table=SHARED_TABLE)
        worker = SqliteStore(tmp_path / "state.sqlite3", table=SHARED_TABLE, create=False,
                             identity=parent.file_identity())
        yield parent, worker
        worker.close()
        parent.close()
    else:
        writer, reader = RedisStore(REDIS_URL, prefix=prefix), RedisStore(REDIS_URL, prefix=prefix)
        yield writer, reader
        reader.stop_waiting("m")


def test_maps_set_read_and_delete_fields(two_clients):
    writer, reader = two_clients
    assert reader.map_items("m") == {} and reader.map_size("m") == 0 and reader.map_version("m") == 0
    writer.map_set("m", {"a": b"1", "b": b"\x00\xff"})
    writer.map_set("m", {"a": b"2"})
    assert reader.map_items("m") == {"a": b"2", "b": b"\x00\xff"}
    assert reader.map_get("m", ["b", "missing", "a"]) == [b"\x00\xff", None, b"2"]
    assert reader.map_size("m") == 2 and reader.map_items("other") == {}
    assert reader.map_version("m") == 0  # no notice asked for
    assert writer.map_delete("m", ["a", "missing"]) == 1
    assert reader.map_items("m") == {"b": b"\x00\xff"}


def test_delete_unchanged_drops_a_field_only_while_it_holds_the_value_read(two_clients):
    writer, reader = two_clients
    writer.map_set("m", {"a": b"old", "b": b"\x00\xff", "c": b"kept"})
    read = reader.map_items("m")
    writer.map_set("m", {"a": b"new"})  # written between the read and the delete
    assert reader.map_delete_unchanged("m", {**read, "missing": b"x"}) == 2
    assert writer.map_items("m") == {"a": b"new"}
    assert reader.map_delete_unchanged("m", {}) == 0


def test_a_notifying_change_advances_the_version(two_clients):
    writer, reader = two_clients
    writer.map_set("m", {"a": b"1"}, notify=True)
    first = reader.map_version("m")
    writer.map_delete("m", ["a"], notify=True)
    second = reader.map_version("m")
    assert len({0, first, second}) == 3 and reader.map_items("m") == {}


def test_a_waiting_reader_wakes_on_a_change_made_by_another_client(two_clients):
    writer, reader = two_clients
    seen = reader.map_version("m")
    reader.wait_for_change("m", seen, 0.2)  # Redis: the first call subscribes and returns
    woke = threading.Event()

    def wait() -> None:
        reader.wait_for_change("m", seen, 10.0)
        woke.set()

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.1)
    started = time.monotonic()
    writer.map_set("m", {"a": b"1"}, notify=True)
    assert woke.wait(5.0), "no wake-up within 5 s"
    assert time.monotonic() - started < 2.0  # ~1 ms on Redis and in memory, ≤ 0.25 s polling SQLite
    thread.join()
    assert reader.map_version("m") != seen


def test_waiting_without_a_change_returns_after_the_timeout(two_clients):
    _, reader = two_clients
    seen = reader.map_version("m")
    reader.wait_for_change("m", seen, 0.1)
    started = time.monotonic()
    reader.wait_for_change("m", seen, 0.3)
    assert 0.2 < time.monotonic() - started < 3.0


def test_an_unavailable_store_refuses_maps_and_waits_quietly():
    store = UnavailableStore("gone")
    for call in (lambda: store.map_set("m", {"a": b"1"}), lambda: store.map_items("m"),
                 lambda: store.map_version("m"), lambda: store.map_delete("m", ["a"]),
                 lambda: store.map_get("m", ["a"]), lambda: store.map_size("m"),
                 lambda: store.map_delete_unchanged("m", {"a": b"1"})):
        with pytest.raises(StoreUnavailable):
            call()
    store.wait_for_change("m", 0, 0.01)


def test_redis_down_raises_store_unavailable_for_maps_and_waiting_does_not_raise():
    from servers import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    with pytest.raises(StoreUnavailable):
        store.map_version("m")
    with pytest.raises(StoreUnavailable):
        store.map_set("m", {"a": b"1"}, notify=True)
    started = time.monotonic()
    store.wait_for_change("m", 0, 0.3)
    store.wait_for_change("m", 0, 0.3)
    assert time.monotonic() - started < 3.0
    store.stop_waiting("m")
